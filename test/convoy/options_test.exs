defmodule Convoy.OptionsTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  defp start(opts), do: Convoy.Queue.child_spec(opts)

  test "the original options keep their defaults" do
    opts = Convoy.Queue.Options.validate!(stream: :device_service_dev)
    assert opts[:stream] == "device_service_dev"
    assert opts[:stream_id] == "device_service_dev"
    assert opts[:service] == Convoy.Services.Kinesis
    assert opts[:batch_timeout] == 5000
    assert opts[:poll_interval] == nil
    assert opts[:iterator_type] == :latest
    assert Convoy.Queue.Options.validate!(stream: "s", stream_id: :other)[:stream_id] == :other
  end

  test "bad options raise ArgumentError naming the key and the value" do
    cases = [
      {[], ~r/option :stream is required/},
      {[stream: ""], ~r/option :stream: expected a stream name/},
      {[stream: 42], ~r/:stream.*got: 42/},
      {[stream: "my stream"], ~r/:stream: a Kinesis stream name is 1..128 of.*got: "my stream"/},
      {[stream: :"orders/v1"], ~r/:stream: a Kinesis stream name.*got: "orders\/v1"/},
      {[stream: "s", batch_timeout: -1],
       ~r/:batch_timeout: expected a non-negative integer.*got: -1/},
      {[stream: "s", poll_interval: 0],
       ~r/:poll_interval: expected nil or a positive integer.*got: 0/},
      {[stream: "s", iterator_type: :oldest], ~r/:iterator_type.*got: :oldest/},
      {[stream: "s", iterator_type: {:at_sequence_number, "abc"}], ~r/:iterator_type/},
      {[stream: "s", service: String],
       ~r/:service: expected a module implementing Convoy.Service/},
      {[stream: "s", max_in_flight: 0],
       ~r/:max_in_flight: expected an integer in 1..256, got: 0/},
      {[stream: "s", max_record_bytes: 20_000_000], ~r/:max_record_bytes.*20000000/},
      {[stream: "s", on_failure: "nope"], ~r/:on_failure.*"nope"/},
      {[stream: "s", checkpoint: Enum], ~r/:checkpoint.*Enum/},
      {[stream: "s", bogus: 1], ~r/unknown Convoy.Queue options \[:bogus\]/},
      {[stream: "s", kinesis: [endpoint: "x"]], ~r/unknown kinesis: keys \[:endpoint\]/},
      {[stream: "s", kinesis: [region: 1]], ~r/kinesis option :region.*got: 1/},
      {[stream: "s", kinesis: [access_key_id: "a"]],
       ~r/:access_key_id and :secret_access_key must be given together/},
      {:not_a_list, ~r/must be a keyword list/}
    ]

    for {opts, message} <- cases do
      assert_raise ArgumentError, message, fn -> start(opts) end
    end

    # Other services take any name.
    assert Convoy.Queue.Options.validate!(stream: "my stream", service: Convoy.Services.Memory)[
             :stream
           ] == "my stream"
  end

  test "a bad secret is reported without its value" do
    error =
      assert_raise ArgumentError, fn ->
        start(stream: "s", kinesis: [secret_access_key: 12_345_678])
      end

    refute Exception.message(error) =~ "12345678"
  end

  test "secrets never appear in inspect output, logs or crash reports of a queue" do
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRET"
    key_id = "AKIDSECRETKEYID123"

    kinesis = [
      endpoint_url: Convoy.TestSupport.endpoint(),
      access_key_id: key_id,
      secret_access_key: secret
    ]

    config = Convoy.KinesisConfig.resolve(kinesis)
    refute inspect(config) =~ secret
    refute inspect(config) =~ key_id

    stream = Convoy.TestSupport.unique_stream("secret")

    log =
      capture_log(fn ->
        {:ok, pid} =
          Convoy.Queue.start_link(
            stream: stream,
            kinesis: kinesis,
            batch_timeout: 0,
            max_retries: 0
          )

        # The stream does not exist: the failure is logged with its reason.
        Convoy.TestTelemetry.subscribe()
        assert {:error, _} = Convoy.Queue.put(stream, "k", "v", await: 10_000)
        # The reporter logs the failure, then emits this: it has logged
        # before the queue is killed below.
        assert_receive {:telemetry_event, [:convoy, :put, :failed], _, %{stream: ^stream}}, 10_000
        refute inspect(:sys.get_state(pid)) =~ secret
        Process.unlink(pid)
        Process.exit(pid, :kill)
      end)

    assert log =~ "failed after retries"
    refute log =~ secret
    refute log =~ key_id
  end
end

defmodule Convoy.KinesisConfigTest do
  # Changes application config: runs alone, after the async modules.
  use ExUnit.Case, async: false

  test "application config is used, and the queue's option wins over it" do
    Application.put_env(:convoy, :kinesis, region: "eu-west-1", profile: "from-config")

    try do
      assert %{region: "eu-west-1", profile: "from-config"} = Convoy.KinesisConfig.resolve([])

      assert %{region: "ap-south-1", profile: "from-config"} =
               Convoy.KinesisConfig.resolve(region: "ap-south-1")
    after
      Application.delete_env(:convoy, :kinesis)
    end
  end
end
