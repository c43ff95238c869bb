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
end
