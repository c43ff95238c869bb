defmodule Convoy.HandleCacheTest do
  # `put/4` keeps the handle it found in the Registry in the caller's
  # process dictionary. These tests check that a kept handle never outlives
  # its Registry entry: after its owner dies, after an unregister, after the
  # queue stops or is started again, puts reach the queue registered now.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  defmodule Recorder do
    # A service whose handle is a pid that is sent every put.
    def put(pid, key, data, _opts) do
      send(pid, {:put, key, data})
      :ok
    end
  end

  test "a handle registered again by a live process replaces the kept one" do
    id = {:handle_cache, System.unique_integer()}
    me = self()

    owner =
      spawn_link(fn ->
        :ok = Convoy.Queue.register(id, Recorder, me)
        send(me, :registered)

        receive do
          {:swap, handle} ->
            :ok = Convoy.Queue.unregister(id)
            :ok = Convoy.Queue.register(id, Recorder, handle)
            send(me, :swapped)
            Process.sleep(:infinity)
        end
      end)

    assert_receive :registered
    :ok = Convoy.Queue.put(id, "k", "first")
    assert_receive {:put, "k", "first"}

    other = spawn_link(fn -> forward_to(me) end)
    send(owner, {:swap, other})
    assert_receive :swapped
    :ok = Convoy.Queue.put(id, "k", "second")
    assert_receive {:forwarded, {:put, "k", "second"}}
    refute_received {:put, "k", "second"}
  end

  test "a kept handle whose owner died is not used" do
    id = {:handle_cache, System.unique_integer()}
    me = self()
    owner = spawn(fn -> register_and_wait(id, me) end)
    assert_receive :registered
    :ok = Convoy.Queue.put(id, "k", "first")
    assert_receive {:put, "k", "first"}

    ref = Process.monitor(owner)
    Process.exit(owner, :kill)
    assert_receive {:DOWN, ^ref, _, _, _}
    # The Registry drops the entry on its own; the kept handle goes too.
    eventually(fn -> Registry.lookup(Convoy.Registry, {:handle, id}) == [] end)
    assert Convoy.Queue.put(id, "k", "second") == {:error, :unknown_stream}
    refute_received {:put, _, _}
  end

  test "after the producer's owner is killed, puts reach the new producer and the old one is closed" do
    stream = create_stream!(unique_stream("cache-kill"), 1)
    start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 50})

    :ok = Convoy.Queue.put(stream, "k", "before")
    [{owner, {_, %{producer: old}}}] = Registry.lookup(Convoy.Registry, {:handle, stream})
    ref = Process.monitor(owner)
    Process.exit(owner, :kill)
    assert_receive {:DOWN, ^ref, _, _, :killed}

    # The old producer, still held here, refuses records once its owner is
    # gone: a kept handle cannot take them.
    eventually(fn -> Convoy.Native.producer_put(old, "k", "x", nil, nil) == {:error, :closed} end)

    eventually(fn -> Convoy.Queue.put(stream, "k", "after") == :ok end)
    [{new_owner, {_, %{producer: new}}}] = Registry.lookup(Convoy.Registry, {:handle, stream})
    assert new_owner != owner and new != old
    :ok = Convoy.Queue.flush(stream, await: 10_000)

    eventually(fn ->
      Enum.sort(Enum.map(read_all(stream), & &1.data)) == ["after", "before"]
    end)
  end

  test "a queue stopped and started again under the same id gets the puts" do
    stream = create_stream!(unique_stream("cache-restart"), 1)
    options = [stream: stream, kinesis: kinesis(), batch_timeout: 50]
    first = start_supervised!({Convoy.Queue, options}, id: :first)
    :ok = Convoy.Queue.put(stream, "k", "one")
    :ok = Convoy.Queue.flush(stream, await: 10_000)

    :ok = stop_supervised(:first)
    refute Process.alive?(first)
    assert Convoy.Queue.put(stream, "k", "lost") == {:error, :unknown_stream}

    start_supervised!({Convoy.Queue, options}, id: :second)
    :ok = Convoy.Queue.put(stream, "k", "two")
    :ok = Convoy.Queue.flush(stream, await: 10_000)
    assert Enum.map(read_all(stream), & &1.data) == ["one", "two"]
  end

  defp register_and_wait(id, me) do
    :ok = Convoy.Queue.register(id, Recorder, me)
    send(me, :registered)
    Process.sleep(:infinity)
  end

  defp forward_to(pid) do
    receive do
      message ->
        send(pid, {:forwarded, message})
        forward_to(pid)
    end
  end
end
