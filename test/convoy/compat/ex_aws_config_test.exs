defmodule Convoy.Compat.ExAwsConfigTest do
  # Convoy 0.1 was configured through ExAws. The application environment is
  # global, so these tests run alone.
  use ExUnit.Case, async: false

  import Convoy.TestSupport

  alias Convoy.KinesisConfig

  setup do
    saved_convoy = Application.fetch_env(:convoy, :kinesis)
    saved_ex_aws = Application.get_all_env(:ex_aws)
    Application.delete_env(:convoy, :kinesis)
    for {key, _} <- saved_ex_aws, do: Application.delete_env(:ex_aws, key)

    on_exit(fn ->
      for {key, _} <- Application.get_all_env(:ex_aws), do: Application.delete_env(:ex_aws, key)
      for {key, value} <- saved_ex_aws, do: Application.put_env(:ex_aws, key, value)

      case saved_convoy do
        {:ok, value} -> Application.put_env(:convoy, :kinesis, value)
        :error -> Application.delete_env(:convoy, :kinesis)
      end

      for var <- ["CONVOY_TEST_KEY_A", "CONVOY_TEST_KEY_B", "CONVOY_TEST_SECRET"],
          do: System.delete_env(var)
    end)

    :ok
  end

  defp ex_aws(settings), do: for({k, v} <- settings, do: Application.put_env(:ex_aws, k, v))

  test "the README's old dev config points Convoy at the local Kinesis" do
    System.put_env("CONVOY_TEST_KEY_A", "from-env")
    System.put_env("CONVOY_TEST_SECRET", "secret-from-env")

    ex_aws(
      debug_requests: true,
      kinesis: %{
        host: "localhost",
        port: 4567,
        scheme: "http://",
        access_key_id: [{:system, "CONVOY_TEST_KEY_A"}, :instance_role],
        secret_access_key: [{:system, "CONVOY_TEST_SECRET"}, :instance_role]
      }
    )

    config = KinesisConfig.resolve([])
    assert config.endpoint_url == "http://localhost:4567"
    assert config.region == "us-east-1"
    assert config.access_key_id == "from-env"
    assert config.secret_access_key == "secret-from-env"
    refute inspect(config) =~ "secret-from-env"
  end

  test "credential forms: a list is tried in order, unset variables and :instance_role give nothing" do
    System.put_env("CONVOY_TEST_KEY_B", "second")

    ex_aws(
      access_key_id: [{:system, "CONVOY_TEST_KEY_A"}, {:system, "CONVOY_TEST_KEY_B"}, "third"],
      secret_access_key: "plain"
    )

    assert %{access_key_id: "second", secret_access_key: "plain"} = KinesisConfig.resolve([])

    ex_aws(
      access_key_id: [{:system, "CONVOY_TEST_KEY_A"}, :instance_role],
      secret_access_key: :instance_role
    )

    assert %{access_key_id: nil, secret_access_key: nil} = KinesisConfig.resolve([])

    ex_aws(
      access_key_id: {:system, "CONVOY_TEST_KEY_B"},
      secret_access_key: {:system, "CONVOY_TEST_KEY_B"}
    )

    assert %{access_key_id: "second"} = KinesisConfig.resolve([])

    ex_aws(access_key_id: [{:awscli, "dev", 30}], secret_access_key: [{:awscli, "dev", 30}])
    assert %{profile: "dev", access_key_id: nil} = KinesisConfig.resolve([])

    ex_aws(access_key_id: [:nonsense], secret_access_key: "x")
    error = assert_raise ArgumentError, fn -> KinesisConfig.resolve([]) end
    assert error.message =~ ":access_key_id"
  end

  test "the :kinesis level wins over the top level, key by key" do
    ex_aws(
      region: "eu-west-1",
      access_key_id: "top-key",
      secret_access_key: "top-secret",
      kinesis: [
        host: "127.0.0.1",
        scheme: "http",
        access_key_id: "kinesis-key",
        secret_access_key: "ks"
      ]
    )

    config = KinesisConfig.resolve([])
    assert config.endpoint_url == "http://127.0.0.1"
    assert config.region == "eu-west-1"
    assert config.access_key_id == "kinesis-key"

    ex_aws(kinesis: %{region: "ap-south-1"})
    config = KinesisConfig.resolve([])
    assert config.region == "ap-south-1"
    # No host: AWS' own endpoint for the region.
    assert config.endpoint_url == nil
    assert config.access_key_id == "top-key"
  end

  test "precedence: the queue's option, then config :convoy (whole), then ExAws" do
    ex_aws(kinesis: %{host: "localhost", port: 4567, scheme: "http://", region: "eu-west-1"})
    assert KinesisConfig.resolve(region: "us-west-2").endpoint_url == "http://localhost:4567"
    assert KinesisConfig.resolve(region: "us-west-2").region == "us-west-2"

    Application.put_env(:convoy, :kinesis, region: "eu-central-1")
    config = KinesisConfig.resolve([])
    assert config.region == "eu-central-1"
    assert config.endpoint_url == nil
  end

  test "a local endpoint configured the old way that cannot be used raises instead of falling back" do
    for bad <- [
          %{host: "localhost", port: "x"},
          %{host: "", port: 4567},
          %{host: "localhost", scheme: "ftp://"}
        ] do
      ex_aws(kinesis: bad)

      assert_raise ArgumentError, ~r/ex_aws/, fn ->
        Convoy.Queue.child_spec(stream: "events")
      end
    end
  end

  test "a queue configured only through ExAws reads and writes the local emulator" do
    uri = URI.parse(endpoint())
    stream = create_stream!(unique_stream("ex-aws"), 1)

    ex_aws(
      access_key_id: "local",
      secret_access_key: "local",
      kinesis: %{host: uri.host, port: uri.port, scheme: "#{uri.scheme}://", region: "us-east-1"}
    )

    start_supervised!(
      {Convoy.Queue,
       stream: String.to_atom(stream), iterator_type: :trim_horizon, batch_timeout: 20}
    )

    assert {:ok, _} = Convoy.Queue.put(stream, "k", "via ex_aws config", await: 10_000)
    assert [%{data: "via ex_aws config"}] = Convoy.Queue.get(stream)
    assert [%{data: "via ex_aws config"}] = read_all(stream)
  end
end
