defmodule Convoy.BadInputTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @documented_put_errors [
    :unknown_stream,
    :closed,
    :overloaded,
    :invalid_partition_key,
    :invalid_explicit_hash_key,
    :invalid_data,
    :record_too_large,
    :unknown_options,
    :invalid_options,
    :invalid_await
  ]

  defp weird_values do
    [
      nil,
      true,
      :atom,
      0,
      -1,
      1.5,
      Integer.pow(2, 200),
      -Integer.pow(2, 70),
      "",
      "ok",
      <<0xFF, 0xFE>>,
      <<1::3>>,
      String.duplicate("k", 257),
      String.duplicate("é", 300),
      :binary.copy("x", 1024 * 1024 + 1),
      {:tuple, 1},
      [1 | 2],
      [1, [2, [3, [4, %{"deep" => [nil]}]]]],
      %{self() => 1},
      %{"pid" => self()},
      %{1 => :one, 2.5 => "two"},
      self(),
      make_ref(),
      fn -> :f end,
      hd(Port.list() ++ [nil])
    ]
  end

  defp documented?(:ok), do: true
  defp documented?({:ok, %{shard_id: _, sequence_number: _}}), do: true
  defp documented?({:error, reason}) when is_atom(reason), do: reason in @documented_put_errors

  defp documented?({:error, reason}) when is_tuple(reason),
    do: elem(reason, 0) in @documented_put_errors

  defp documented?(_), do: false

  test "put/3 and put/4 with malformed values answer documented errors and lose nothing accepted" do
    stream = create_stream!(unique_stream("bad-input"), 2)
    pid = start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 50})
    :ok = Convoy.Queue.put(stream, "marker", "before")
    values = weird_values()

    accepted =
      for key <- values, data <- values, reduce: [] do
        acc ->
          result = Convoy.Queue.put(stream, key, data)

          assert documented?(result),
                 "put(#{inspect(key)}, #{inspect(data, limit: 5)}) -> #{inspect(result)}"

          if result == :ok, do: [data | acc], else: acc
      end

    for opts <- [
          [await: -1],
          [await: :soon],
          [explicit_hash_key: :x],
          [explicit_hash_key: "1e5"],
          :not_a_list,
          [{1, 2}],
          [bogus: 1]
        ] do
      result = Convoy.Queue.put(stream, "k", "v", opts)

      assert match?({:error, _}, result) and documented?(result),
             "opts #{inspect(opts)} -> #{inspect(result)}"
    end

    for opts <- [:bad, [await: -1], [await: :soon], [bogus: 1]] do
      assert {:error, _} = Convoy.Queue.flush(stream, opts)
    end

    assert Process.alive?(pid)
    assert :ok = Convoy.Queue.flush(stream, await: 30_000)
    delivered = read_all(stream) |> Enum.map(& &1.data)
    assert "before" in delivered
    assert length(delivered) == length(accepted) + 1
    assert %{failed: 0} = Convoy.Queue.stats(stream)
  end

  test "attach_handler/4,5, detach and get with malformed values return errors, the queue stays up" do
    stream = create_stream!(unique_stream("bad-handler"), 1)

    pid =
      start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis(), poll_interval: 100})

    for handler <- [
          nil,
          :atom,
          "fun",
          fn -> 0 end,
          fn _ -> 1 end,
          fn _, _, _ -> 3 end,
          {:mod, :fun}
        ] do
      assert {:error, {:invalid_handler, ^handler}} =
               Convoy.Queue.attach_handler(stream, :h, handler, nil)
    end

    ok = fn _, _ -> :ok end

    for opts <- [
          [partition_keys: 1],
          [partition_keys: [1]],
          [on_error: :ignore],
          [on_error: {:retry, 0}],
          [ack_timeout: -5],
          [what: 1],
          :bad
        ] do
      assert {:error, _} = Convoy.Queue.attach_handler(stream, :h, ok, nil, opts)
    end

    for limit <- [0, -1, 10_001, 1.5, :ten, nil] do
      assert {:error, {:invalid_limit, ^limit}} = Convoy.Queue.get(stream, limit)
    end

    assert Convoy.Queue.detach_handler(stream, make_ref(), strict: true) == {:error, :not_found}
    assert Convoy.Queue.attach_handler(:nope, :h, ok, nil) == {:error, :unknown_stream}
    assert Process.alive?(pid)
    assert :ok = Convoy.Queue.attach_handler(stream, :h, ok, nil)
  end

  test "start_link with malformed options raises an ArgumentError naming the problem" do
    for {opts, pattern} <- [
          {[stream: nil], ~r/:stream is required/},
          {[stream: {1}], ~r/:stream/},
          {[stream: "s", batch_timeout: "5"], ~r/:batch_timeout/},
          {[stream: "s", poll_interval: -1], ~r/:poll_interval/},
          {[stream: "s", max_buffered_records: 0], ~r/:max_buffered_records/},
          {[stream: "s", kinesis: [endpoint_url: 5]], ~r/:endpoint_url/},
          {[stream: "s", kinesis: :nope], ~r/:kinesis/},
          {[stream: "s", on_failure: fn -> 1 end], ~r/:on_failure/},
          {[stream: "s", aggregation: "yes"], ~r/:aggregation/},
          {[stream: "s", service_options: 3], ~r/:service_options/},
          {%{stream: "s"}, ~r/keyword list/}
        ] do
      assert_raise ArgumentError, pattern, fn -> Convoy.Queue.start_link(opts) end
    end
  end
end

defmodule Convoy.SchedulerSafetyTest do
  # system_monitor is VM-wide: this module runs alone.
  use ExUnit.Case, async: false

  import Convoy.TestSupport

  @tag timeout: 300_000
  test "under put and consume load no Convoy NIF causes a long schedule (> 5 ms)" do
    stream = create_stream!(unique_stream("long-schedule"), 4)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(),
       batch_timeout: 20,
       poll_interval: 20,
       iterator_type: :trim_horizon}
    )

    counter = :counters.new(1, [])

    :ok =
      Convoy.Queue.attach_handler(
        stream,
        :count,
        fn _, _ -> :counters.add(counter, 1, 1) end,
        nil
      )

    per_process = volume(10_000)
    previous = :erlang.system_monitor(self(), [{:long_schedule, 5}])

    try do
      1..4
      |> Task.async_stream(
        fn p ->
          for i <- 1..per_process do
            data =
              if rem(i, 10) == 0,
                do: %{"p" => p, "i" => i, "list" => Enum.to_list(1..50)},
                else: "r-#{p}-#{i}"

            put_until_accepted(stream, "k#{rem(i, 32)}", data)
          end
        end,
        timeout: :infinity
      )
      |> Stream.run()

      eventually(fn -> :counters.get(counter, 1) == 4 * per_process end, 120_000)
    after
      :erlang.system_monitor(previous)
    end

    long = collect_long_schedules([])
    convoy = Enum.filter(long, &convoy_nif?/1)
    assert convoy == [], "long schedules in Convoy NIFs: #{inspect(convoy)}"
  end

  defp collect_long_schedules(acc) do
    receive do
      {:monitor, _who, :long_schedule, info} -> collect_long_schedules([info | acc])
    after
      0 -> acc
    end
  end

  defp convoy_nif?(info) do
    Enum.any?([info[:in], info[:out]], fn
      {Convoy.Native, _, _} -> true
      _ -> false
    end)
  end
end

defmodule Convoy.KilledQueueTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  test "a killed queue is restarted by its supervisor and the old buffer is still delivered" do
    stream = create_stream!(unique_stream("killed"), 2)

    {:ok, sup} =
      Supervisor.start_link(
        [{Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 600_000}],
        strategy: :one_for_one
      )

    for i <- 1..1_000, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 9)}", "before-kill-#{i}")
    [{_, queue, _, _}] = Supervisor.which_children(sup)
    Process.exit(queue, :kill)

    # The supervisor starts a fresh queue; the killed one's records, which
    # were only buffered, are sent by its producer once it is released.
    eventually(fn ->
      match?([{_, pid, _, _}] when is_pid(pid) and pid != queue, Supervisor.which_children(sup))
    end)

    eventually(fn -> Convoy.Queue.put(stream, "k", "after-restart") == :ok end)
    :ok = Convoy.Queue.flush(stream, await: 30_000)

    datas = fn -> read_all(stream) |> Enum.map(& &1.data) end
    eventually(fn -> length(datas.()) == 1_001 end, 30_000)

    assert Enum.sort(datas.()) ==
             Enum.sort(["after-restart" | for(i <- 1..1_000, do: "before-kill-#{i}")])

    Supervisor.stop(sup)
  end

  test "a killed queue's producer sends its buffer at once, without waiting for a restart" do
    stream = create_stream!(unique_stream("killed-alone"), 2)

    {:ok, queue} =
      Convoy.Queue.start_link(stream: stream, kinesis: kinesis(), batch_timeout: 600_000)

    Process.unlink(queue)

    for i <- 1..500, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 9)}", "orphan-#{i}")
    Process.exit(queue, :kill)

    # Nobody restarts it; the batch timeout is 10 minutes away.
    datas = fn -> read_all(stream) |> Enum.map(& &1.data) end
    eventually(fn -> length(datas.()) == 500 end, 30_000)
    assert Enum.sort(datas.()) == Enum.sort(for i <- 1..500, do: "orphan-#{i}")
    # The queue's tree is gone, and with it every trace of the stream_id.
    assert Convoy.Queue.put(stream, "k", "late") == {:error, :unknown_stream}
  end

  test "what a killed queue's producer finally fails still reaches on_failure and the log" do
    me = self()
    # The stream never exists: every attempt fails until the retries run out.
    stream = unique_stream("killed-missing")

    log =
      capture_log(fn ->
        {:ok, queue} =
          Convoy.Queue.start_link(
            stream: stream,
            kinesis: kinesis(),
            batch_timeout: 600_000,
            max_retries: 1,
            retry_backoff: 10,
            # One lane and 20 keys: one request, one log line.
            max_in_flight: 1,
            on_failure: fn failure -> send(me, {:failed, failure}) end
          )

        Process.unlink(queue)
        for i <- 1..20, do: :ok = Convoy.Queue.put(stream, "k#{i}", "doomed-#{i}")
        Process.exit(queue, :kill)

        failed =
          for _ <- 1..20 do
            assert_receive {:failed,
                            %{data: data, reason: {:aws, "ResourceNotFoundException", _}}},
                           10_000

            data
          end

        assert Enum.sort(failed) == Enum.sort(for i <- 1..20, do: "doomed-#{i}")
      end)

    assert log =~ "Convoy #{inspect(stream)}: 20 record(s) failed after retries"
  end
end

defmodule Convoy.CrashingHandlerTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  test "a handler crashing on every 10th record, with on_error: :retry, handles each record exactly once" do
    stream = create_stream!(unique_stream("every-nth"), 2)

    start_supervised!(
      {Convoy.Queue,
       stream: stream, kinesis: kinesis(), iterator_type: :trim_horizon, poll_interval: 50}
    )

    me = self()
    crashed = :ets.new(:crashed, [:public, :set])

    handler = fn record, _ ->
      n = record.data |> String.trim_leading("record-") |> String.to_integer()

      # The first attempt at every 10th record crashes; the retry succeeds.
      if rem(n, 10) == 0 and :ets.insert_new(crashed, {n}), do: raise("crash on #{n}")
      send(me, {:handled, n})
    end

    capture_log(fn ->
      :ok = Convoy.Queue.attach_handler(stream, :flaky, handler, nil, on_error: {:retry, 3})
      raw_put!(stream, 500)

      handled =
        for _ <- 1..500 do
          assert_receive {:handled, n}, 15_000
          n
        end

      refute_receive {:handled, _}, 300
      assert Enum.sort(handled) == Enum.to_list(0..499)
      # 50 crashes, each retried once.
      assert :ets.info(crashed, :size) == 50
    end)
  end
end

defmodule Convoy.HangingEndpointTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog

  test "attach_handler answers while listing shards hangs on an endpoint that never replies" do
    # Accepts connections (the kernel does, into the backlog), never answers.
    {:ok, listener} = :gen_tcp.listen(0, [:binary, active: false, ip: {127, 0, 0, 1}])
    {:ok, port} = :inet.port(listener)
    stream = "hanging-#{System.unique_integer([:positive])}"
    # Longer than GenServer.call's 5 s: a blocking attach would exit the caller.
    kinesis = Convoy.Local.kinesis_options("http://127.0.0.1:#{port}") ++ [request_timeout: 6_000]

    capture_log(fn ->
      start_supervised!({Convoy.Queue, stream: stream, kinesis: kinesis, poll_interval: 50})
      assert :ok = Convoy.Queue.attach_handler(stream, :h, fn _, _ -> :ok end, nil)
      assert :ok = Convoy.Queue.detach_handler(stream, :h)
      assert %{sent: 0} = Convoy.Queue.stats(stream)
    end)

    :gen_tcp.close(listener)
  end
end

defmodule Convoy.ConsumerOutageTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @moduletag :embedded_only

  test "the emulator killed and restarted mid-consume: reading resumes and nothing new is missed" do
    {:ok, local} = Convoy.Local.start()
    endpoint = Convoy.Local.endpoint(local)
    port = URI.parse(endpoint).port
    stream = create_stream!(unique_stream("consume-outage"), 1, endpoint)

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       kinesis: kinesis(endpoint),
       iterator_type: :trim_horizon,
       poll_interval: 50,
       retry_backoff: 50,
       max_backoff: 500}
    )

    me = self()
    :ok = Convoy.Queue.attach_handler(stream, :h, fn r, _ -> send(me, {:got, r.data}) end, nil)
    raw_put!(stream, 100, endpoint: endpoint)

    for i <- 0..99 do
      expected = "record-#{i}"
      assert_receive {:got, ^expected}, 10_000
    end

    # The emulator dies (with its data) and comes back empty on the same port.
    Convoy.Local.stop(local)
    Process.sleep(1_000)
    {:ok, local} = Convoy.Local.start(port: port)
    create_stream!(stream, 1, endpoint)
    raw_put!(stream, 100, start: 100, endpoint: endpoint)

    got =
      for _ <- 100..199 do
        assert_receive {:got, "record-" <> n}, 60_000
        String.to_integer(n)
      end

    assert Enum.sort(got) == Enum.to_list(100..199)
    Convoy.Local.stop(local)
  end
end

defmodule Convoy.RestartResumeTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @tag :tmp_dir
  test "a killed queue comes back with its :handlers and resumes from the file checkpoint", %{
    tmp_dir: dir
  } do
    resumes_after_kill({Convoy.Checkpoint.File, dir: dir})
  end

  test "a killed queue comes back with its :handlers and resumes from the memory checkpoint" do
    resumes_after_kill(Convoy.Checkpoint.Memory)
  end

  defp resumes_after_kill(checkpoint) do
    stream = create_stream!(unique_stream("resume"), 2)
    me = self()
    handler = fn record, tag -> send(me, {tag, record.data}) end

    {:ok, sup} =
      Supervisor.start_link(
        [
          {Convoy.Queue,
           stream: stream,
           kinesis: kinesis(),
           iterator_type: :trim_horizon,
           poll_interval: 50,
           checkpoint: checkpoint,
           handlers: [{:h, handler, :seen}]}
        ],
        strategy: :one_for_one
      )

    raw_put!(stream, 100)
    first = for _ <- 1..100, do: assert_receive({:seen, data}, 10_000) && data
    # Let the last batch's checkpoint be written before the kill.
    Process.sleep(300)
    [{_, queue, _, _}] = Supervisor.which_children(sup)
    Process.exit(queue, :kill)

    eventually(fn ->
      match?([{_, pid, _, _}] when is_pid(pid) and pid != queue, Supervisor.which_children(sup))
    end)

    raw_put!(stream, 100, start: 100)
    # Only the new records: a lost checkpoint would replay the first 100.
    second = for _ <- 1..100, do: assert_receive({:seen, data}, 20_000) && data
    refute_receive {:seen, _}, 500
    assert Enum.sort(first) == Enum.sort(for i <- 0..99, do: "record-#{i}")
    assert Enum.sort(second) == Enum.sort(for i <- 100..199, do: "record-#{i}")
    Supervisor.stop(sup)
  end

  test "bad :handlers raise ArgumentError at start" do
    assert_raise ArgumentError, ~r/:handlers/, fn ->
      Convoy.Queue.child_spec(stream: "s", handlers: [{:h, :not_a_fun, nil}])
    end

    assert_raise ArgumentError, ~r/duplicate ids/, fn ->
      Convoy.Queue.child_spec(
        stream: "s",
        handlers: [{:h, fn _, _ -> :ok end, nil}, {:h, fn _, _ -> :ok end, nil}]
      )
    end
  end
end
