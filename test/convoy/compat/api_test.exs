defmodule Convoy.Compat.ApiTest do
  # Convoy 0.1's API, called as an application written for it calls it.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  defmodule Point do
    defstruct [:x]
  end

  defp atom_stream(prefix), do: String.to_atom(unique_stream(prefix))

  defp forward(tag) do
    me = self()
    fn record, config -> send(me, {tag, config, record.data}) end
  end

  describe "atom stream names" do
    test "every call takes the atom, and the atom and the string name the same queue" do
      name = create_stream!(unique_stream("atom"), 1)
      stream = String.to_atom(name)

      start_supervised!(
        {Convoy.Queue, [stream: stream, iterator_type: :trim_horizon, kinesis: kinesis()]}
      )

      assert :ok = Convoy.Queue.put(stream, "devices", "{}")
      assert :ok = Convoy.Queue.put(stream, "devices", %{n: 2})
      assert :ok = Convoy.Queue.flush(stream)
      assert :ok = Convoy.Queue.put(name, "devices", "three")
      assert :ok = Convoy.Queue.flush(name, await: 10_000)
      assert %{sent: 3} = Convoy.Queue.stats(stream)

      # One position, whichever name reads: the atom takes the first record,
      # the string the rest.
      assert [%{data: "{}", partition_key: "devices"}] = Convoy.Queue.get(stream, 1)
      assert [%{data: ~s({"n":2})}, %{data: "three"}] = Convoy.Queue.get(name)
      assert [] = Convoy.Queue.get(stream)

      assert :ok = Convoy.Queue.attach(stream, :h, fn _, _ -> :ok end, nil)
      assert :ok = Convoy.Queue.detach(name, :h)
      assert :ok = Convoy.Queue.attach_handler(name, :h, fn _, _ -> :ok end, nil)
      assert :ok = Convoy.Queue.detach_handler(stream, :h)

      # A second queue under the other spelling is the same queue.
      assert {:error, {:already_started, _}} =
               Convoy.Queue.start_link(stream: name, kinesis: kinesis())
    end

    test "a stream_id atom and its string reach one Memory queue" do
      id = atom_stream("atom-id")

      start_supervised!(
        {Convoy.Queue, stream: "s", stream_id: id, service: Convoy.Services.Memory}
      )

      assert :ok = Convoy.Queue.put(Atom.to_string(id), "k", "v")
      assert %{sent: 1} = Convoy.Queue.stats(id)
      :ok = Convoy.Services.Memory.fail_next_puts(Atom.to_string(id), 1)

      ExUnit.CaptureLog.capture_log(fn ->
        assert {:error, {:aws, "InternalFailure", _}} = Convoy.Queue.put(id, "k", "lost")
      end)
    end

    test "checkpoints stored under an atom stream_id are found under its string" do
      id = atom_stream("atom-checkpoint")
      me = self()

      options = [
        stream: "s",
        service: Convoy.Services.Memory,
        poll_interval: 10,
        iterator_type: :trim_horizon,
        handlers: [{:h, fn record, _ -> send(me, {:got, record.data}) end, nil}]
      ]

      start_supervised!({Convoy.Queue, [stream_id: id] ++ options}, id: :first)
      :ok = Convoy.Queue.put(id, "k", "one")
      assert_receive {:got, "one"}, 5_000
      stop_supervised!(:first)

      for checkpoint <- [Convoy.Checkpoint.Memory] do
        assert {:ok, seq} = checkpoint.fetch(checkpoint, id, "shardId-000000000000")

        assert {:ok, ^seq} =
                 checkpoint.fetch(checkpoint, Atom.to_string(id), "shardId-000000000000")
      end

      dir = Path.join(System.tmp_dir!(), "convoy-atom-#{System.unique_integer([:positive])}")
      {:ok, dir} = Convoy.Checkpoint.File.init(dir: dir)
      :ok = Convoy.Checkpoint.File.store(dir, id, "shardId-000000000000", "42")

      assert {:ok, "42"} =
               Convoy.Checkpoint.File.fetch(dir, Atom.to_string(id), "shardId-000000000000")

      File.rm_rf!(dir)
    end

    test "an unknown stream answers an error for the atom too" do
      assert Convoy.Queue.put(:no_such_stream_anywhere, "k", "v") == {:error, :unknown_stream}
      assert Convoy.Queue.get(:no_such_stream_anywhere) == {:error, :unknown_stream}
    end
  end

  describe "child_spec/1" do
    test "has the original id and restart type" do
      spec = Convoy.Queue.child_spec(stream: :events, service: Convoy.Services.Memory)
      assert spec.id == :stream_events
      assert spec.restart == :transient

      assert Convoy.Queue.child_spec(stream: "events", stream_id: :replay).id == :stream_replay

      assert Convoy.Queue.child_spec(stream: "events", stream_id: {:a, 1}).id ==
               {Convoy.Queue, {:a, 1}}
    end

    test "supervisor calls that name the child by its old id work" do
      stream = atom_stream("child")

      children = [{Convoy.Queue, [stream: stream, service: Convoy.Services.Memory]}]

      sup =
        start_supervised!(%{
          id: :app,
          start: {Supervisor, :start_link, [children, [strategy: :one_for_one]]},
          type: :supervisor
        })

      child_id = :"stream_#{stream}"

      assert [{^child_id, pid, :supervisor, _}] = Supervisor.which_children(sup)
      assert {:ok, %{restart: :transient}} = :supervisor.get_childspec(sup, child_id)
      assert :ok = Convoy.Queue.put(stream, "k", "v")

      assert :ok = Supervisor.terminate_child(sup, child_id)
      refute Process.alive?(pid)
      assert Convoy.Queue.put(stream, "k", "v") == {:error, :unknown_stream}

      assert {:ok, _} = Supervisor.restart_child(sup, child_id)
      assert :ok = Convoy.Queue.put(stream, "k", "v")
    end
  end

  describe "attach and detach keep their old semantics" do
    setup do
      stream = atom_stream("attach")

      start_supervised!(
        {Convoy.Queue,
         stream: stream,
         service: Convoy.Services.Memory,
         poll_interval: 10,
         iterator_type: :trim_horizon}
      )

      %{stream: stream}
    end

    test "attach/4 with an id in use replaces the handler", %{stream: stream} do
      assert :ok = Convoy.Queue.attach(stream, :h, forward(:old), :cfg)
      :ok = Convoy.Queue.put(stream, "k", "1")
      assert_receive {:old, :cfg, "1"}, 5_000

      assert :ok = Convoy.Queue.attach(stream, :h, forward(:new), :cfg2)
      :ok = Convoy.Queue.put(stream, "k", "2")
      assert_receive {:new, :cfg2, "2"}, 5_000
      refute_receive {:old, _, _}, 300
      refute_receive {:new, _, _}, 10
    end

    test "attach_handler/4 replaces too; attach_handler/5 refuses unless replace: true",
         %{stream: stream} do
      assert :ok = Convoy.Queue.attach_handler(stream, :h, forward(:a), nil)
      assert :ok = Convoy.Queue.attach_handler(stream, :h, forward(:b), nil)

      assert Convoy.Queue.attach_handler(stream, :h, forward(:c), nil, []) ==
               {:error, :already_exists}

      :ok = Convoy.Queue.put(stream, "k", "x")
      assert_receive {:b, nil, "x"}, 5_000

      assert :ok = Convoy.Queue.attach_handler(stream, :h, forward(:d), nil, replace: true)
      :ok = Convoy.Queue.put(stream, "k", "y")
      assert_receive {:d, nil, "y"}, 5_000
      refute_receive {:a, _, _}, 300
      refute_received {:b, _, _}
      refute_received {:c, _, _}
    end

    test "detach/2 and detach_handler/2 of an unknown id answer :ok; strict: true says so",
         %{stream: stream} do
      assert :ok = Convoy.Queue.detach(stream, :nobody)
      assert :ok = Convoy.Queue.detach_handler(stream, :nobody)
      assert Convoy.Queue.detach_handler(stream, :nobody, strict: true) == {:error, :not_found}

      assert Convoy.Queue.detach_handler(stream, :nobody, bogus: 1) ==
               {:error, {:invalid_options, [bogus: 1]}}

      :ok = Convoy.Queue.attach(stream, :h, forward(:h), nil)
      assert :ok = Convoy.Queue.detach_handler(stream, :h, strict: true)
    end
  end

  describe "data that is not a binary is JSON, as Poison wrote it" do
    setup do
      stream = create_stream!(unique_stream("json"), 1)
      start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 0})
      %{stream: stream}
    end

    test "structs without __struct__, calendar types as ISO 8601", %{stream: stream} do
      data = [
        ~U[2024-01-02 03:04:05.123Z],
        ~N[2024-01-02 03:04:05],
        ~D[2024-01-02],
        ~T[03:04:05.000001],
        %Point{x: 1},
        %{at: ~U[2024-01-02 03:04:05Z]}
      ]

      assert {:ok, _} = Convoy.Queue.put(stream, "k", data, await: 10_000)
      assert [record] = Convoy.Queue.get(stream)

      assert record.data ==
               ~s(["2024-01-02T03:04:05.123Z","2024-01-02T03:04:05","2024-01-02",) <>
                 ~s("03:04:05.000001",{"x":1},{"at":"2024-01-02T03:04:05Z"}])
    end

    test "a value with no JSON form is named by where it is", %{stream: stream} do
      assert Convoy.Queue.put(stream, "k", %{user: %{"pids" => [1, self()]}}) ==
               {:error, {:invalid_data, ~s(a pid has no JSON form, at [:user]["pids"][1])}}

      assert Convoy.Queue.put(stream, "k", [%{a: {1, 2}}]) ==
               {:error, {:invalid_data, "a tuple has no JSON form, at [0][:a]"}}

      assert Convoy.Queue.put(stream, "k", {1, 2}) ==
               {:error, {:invalid_data, "a tuple has no JSON form"}}
    end

    test "the Memory service encodes the same way" do
      stream = atom_stream("json-memory")
      start_supervised!({Convoy.Queue, stream: stream, service: Convoy.Services.Memory})
      assert {:ok, _} = Convoy.Queue.put(stream, "k", %{d: ~D[2024-01-02]}, await: 1_000)
      assert [%{data: ~s({"d":"2024-01-02"})}] = Convoy.Queue.get(stream)

      assert Convoy.Queue.put(stream, "k", %{f: [fn -> :ok end]}) ==
               {:error, {:invalid_data, "a function has no JSON form, at [:f][0]"}}
    end
  end

  test "calendar values encode exactly as their to_iso8601/1" do
    offsets = [
      {"Etc/UTC", "UTC", 0, 0},
      {"Europe/Paris", "CEST", 3600, 3600},
      {"America/St_Johns", "NST", -12_600, 0},
      {"Europe/London", "GMT", 0, 0}
    ]

    values =
      for year <- [-44, 1, 1999, 2024, 10_000],
          precision <- [0, 1, 3, 6],
          {zone, abbr, utc, std} <- offsets do
        us = rem(123_456 * (year + 50_000), 1_000_000)

        %DateTime{
          year: year,
          month: 2,
          day: 29,
          hour: 23,
          minute: 5,
          second: 9,
          microsecond: {us, precision},
          time_zone: zone,
          zone_abbr: abbr,
          utc_offset: utc,
          std_offset: std
        }
      end

    for dt <- values do
      naive = DateTime.to_naive(dt)

      for value <- [dt, naive, DateTime.to_date(dt), DateTime.to_time(dt)] do
        expected = ~s(") <> value.__struct__.to_iso8601(value) <> ~s(")
        assert Convoy.Native.encode_json(value) == {:ok, expected}, inspect(value)
      end
    end
  end
end
