defmodule Convoy.NativeTest do
  use ExUnit.Case, async: true

  alias Convoy.Native

  test "the library is loaded" do
    assert Native.loaded?()
  end

  test "a message sent from a tokio task reaches a BEAM process" do
    :ok = Native.debug_echo_from_task(self(), "ping")
    assert_receive {:convoy_echo, thread, "ping"}, 5_000
    # It really ran on the runtime's named worker threads.
    assert thread == "convoy-worker"
  end

  test "a panic in a NIF raises in Elixir and the VM lives on" do
    assert_raise ErlangError, ~r/nif_panicked/, fn -> Native.debug_nif_panic() end
    # The same process and the NIF keep working afterwards.
    :ok = Native.debug_echo_from_task(self(), "after panic")
    assert_receive {:convoy_echo, _, "after panic"}, 5_000
  end

  test "a panic in a runtime task is reported, not fatal" do
    :ok = Native.debug_task_panic(self())
    assert_receive {:convoy_task_panic, "debug task", message}, 5_000
    assert message =~ "deliberate panic"
    :ok = Native.debug_echo_from_task(self(), "still alive")
    assert_receive {:convoy_echo, _, "still alive"}, 5_000
  end

  test "an asynchronous call that fails replies {:error, reason}" do
    config = Convoy.KinesisConfig.resolve(Convoy.Local.kinesis_options("http://127.0.0.1:1"))

    {:ok, client} = Native.call(&Native.client_new(Convoy.KinesisConfig.to_native(config), &1))

    assert {:error, {:aws, "DispatchFailure", _}} =
             Native.call(&Native.list_shards_nif(client, "nope", &1))
  end

  test "Kinesis settings cross the boundary under their Elixir names, request_timeout in ms" do
    # An endpoint that takes connections and never answers.
    {:ok, silent} = :gen_tcp.listen(0, ip: {127, 0, 0, 1}, active: false)
    {:ok, port} = :inet.port(silent)

    config =
      Convoy.KinesisConfig.resolve(
        Convoy.Local.kinesis_options("http://127.0.0.1:#{port}") ++ [request_timeout: 200]
      )

    # The struct's own fields, renamed nowhere on the way.
    assert Convoy.KinesisConfig.to_native(config) == Map.from_struct(config)
    {:ok, client} = Native.call(&Native.client_new(Map.from_struct(config), &1))

    # The call ends by its request_timeout of 200 ms: with the default of
    # 10 s, Native.call would give up first, answering {:error, :timeout}.
    assert {:error, {:aws, kind, _}} =
             Native.call(&Native.list_shards_nif(client, "nope", &1), 5_000)

    assert kind =~ "Timeout"
  end

  test "the library an application loads carries no stream administration" do
    exported = Native.__info__(:functions) |> Keyword.keys()
    assert :list_shards_nif in exported

    for admin <- [:create_stream, :delete_stream, :split_shard] do
      refute admin in exported, "Convoy.Native.#{admin} belongs to the kinesis_raw tool"
    end
  end

  test "put_record_check applies put's rules and encoding, for services without the producer" do
    assert Native.put_record_check("k", "raw", nil, 1_000) == {:ok, "raw"}
    assert Native.put_record_check("k", %{"a" => [1]}, nil, 1_000) == {:ok, ~s({"a":[1]})}

    assert Native.put_record_check("k", "x", "01", 1_000) ==
             {:error, {:invalid_explicit_hash_key, ~s("01" is not a decimal integer)}}

    assert Native.put_record_check("kk", "12345678", nil, 9) ==
             {:error, {:record_too_large, 10, 9}}
  end

  test "stream administration through Convoy.Local answers Kinesis errors as terms" do
    endpoint = Convoy.TestSupport.endpoint()

    assert {:error, {:aws, "ResourceNotFoundException", _}} =
             Convoy.Local.split_shard(
               endpoint,
               "no-such-stream-#{System.unique_integer([:positive])}",
               "shardId-000000000000",
               "1"
             )
  end
end
