# Helpers shared by bench/run.exs and bench/profile.exs.

defmodule Bench do
  @root Path.expand("..", __DIR__)
  @python Path.join(@root, "bench/.venv/bin/python")
  @raw Path.join(@root, "target/release/kinesis_raw")

  def runs, do: String.to_integer(System.get_env("BENCH_RUNS", "3"))
  def count, do: String.to_integer(System.get_env("BENCH_RECORDS", "200000"))
  def null_count, do: String.to_integer(System.get_env("BENCH_NULL_RECORDS", "400000"))
  def put_calls, do: String.to_integer(System.get_env("BENCH_PUT_CALLS", "400000"))
  def size, do: 100

  def median(values) do
    sorted = Enum.sort(values)
    Enum.at(sorted, div(length(sorted), 2))
  end

  def repeat(label, fun) do
    values =
      for run <- 1..runs() do
        value = fun.()
        IO.puts("  #{label} run #{run}: #{inspect(value)}")
        value
      end

    median(values)
  end

  # As `repeat/2`, answering the largest value instead of the median.
  def repeat_max(label, fun) do
    for run <- 1..runs() do
      value = fun.()
      IO.puts("  #{label} run #{run}: #{inspect(value)}")
      value
    end
    |> Enum.max()
  end

  def fmt_int(n), do: n |> Integer.to_string() |> String.replace(~r/\B(?=(\d{3})+$)/, ",")

  def seconds(fun) do
    started = System.monotonic_time(:microsecond)
    fun.()
    (System.monotonic_time(:microsecond) - started) / 1_000_000
  end

  # Record i's data: "record-", i as 8 bytes, then padding to `size()`
  # bytes. One binary construction (about 60 ns), as cheap as the peers'
  # own record building, so the clock measures the clients.
  @pad :binary.copy("x", 100 - 15)
  def data(i), do: <<"record-", i::unsigned-big-64, @pad::binary>>

  # CPU time (ns) by thread kind: :schedulers (Elixir code and NIF calls),
  # :runtime (the NIF's tokio threads: lanes, SDK, HTTP), :other (dirty
  # schedulers, I/O, aux).
  def thread_ns do
    "/proc/self/task"
    |> File.ls!()
    |> Enum.reduce(%{schedulers: 0, runtime: 0, other: 0}, fn tid, acc ->
      dir = "/proc/self/task/#{tid}"

      with {:ok, comm} <- File.read(dir <> "/comm"),
           {:ok, stat} <- File.read(dir <> "/schedstat") do
        ns = stat |> String.split() |> hd() |> String.to_integer()

        kind =
          cond do
            Regex.match?(~r/^\d+_scheduler$/, String.trim(comm)) -> :schedulers
            String.starts_with?(comm, "convoy") -> :runtime
            true -> :other
          end

        Map.update!(acc, kind, &(&1 + ns))
      else
        _ -> acc
      end
    end)
  end

  # The CPU ns of every thread of the VM so far (thread_ns/0 summed).
  def total_thread_ns, do: thread_ns() |> Map.values() |> Enum.sum()

  # Runs `fun` and answers `{its result, the CPU ns of each thread kind
  # (thread_ns/0) meanwhile, divided by count}`.
  def threads_per(count, fun) do
    before = thread_ns()
    result = fun.()
    {result, Map.merge(thread_ns(), before, fn _, a, b -> (a - b) / count end)}
  end

  # The figures of `threads_per/2` on one line, in whole ns.
  def threads_line(threads) do
    total = threads.schedulers + threads.runtime + threads.other

    "schedulers #{round(threads.schedulers)}, runtime #{round(threads.runtime)}, " <>
      "other #{round(threads.other)}, total #{round(total)}"
  end

  def scheduler_ns, do: scheduler_ns(scheduler_stats())

  # The schedstat files of the VM's scheduler threads (they live as long as
  # the VM), read once so that a measure taken often reads two files.
  def scheduler_stats do
    "/proc/self/task"
    |> File.ls!()
    |> Enum.map(&"/proc/self/task/#{&1}")
    |> Enum.filter(fn dir ->
      case File.read(dir <> "/comm") do
        {:ok, comm} -> Regex.match?(~r/^\d+_scheduler$/, String.trim(comm))
        _ -> false
      end
    end)
    |> Enum.map(&(&1 <> "/schedstat"))
  end

  def scheduler_ns(stats) do
    stats
    |> Enum.map(fn path ->
      case File.read(path) do
        {:ok, stat} -> stat |> String.split() |> hd() |> String.to_integer()
        _ -> 0
      end
    end)
    |> Enum.sum()
  end

  def cpu_seconds do
    fields =
      "/proc/self/stat" |> File.read!() |> String.split(") ") |> List.last() |> String.split()

    # utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    ticks = String.to_integer(Enum.at(fields, 11)) + String.to_integer(Enum.at(fields, 12))
    ticks / 100
  end

  def stream!(endpoint, prefix, shards \\ 4) do
    name = "#{prefix}-#{System.unique_integer([:positive])}"
    :ok = Convoy.Local.create_stream(endpoint, name, shards)
    name
  end

  # Runs `fun` and answers `{result, peak RSS in KiB while it ran}`: the
  # kernel's high-water mark (VmHWM), reset first through
  # /proc/self/clear_refs, so nothing samples the VM meanwhile (a sampler
  # reading /proc/self/status every 20 ms cost about 3% of the consumer's
  # measured CPU). Where the reset is refused, the mark since the VM started.
  def peak_rss(fun) do
    _ = File.write("/proc/self/clear_refs", "5")
    result = fun.()
    {result, status_kb("VmHWM:")}
  end

  def rss_kb, do: status_kb("VmRSS:")

  defp status_kb(field) do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      if String.starts_with?(line, field) do
        line |> String.trim_leading(field) |> String.split() |> hd() |> String.to_integer()
      end
    end)
  end

  # The last line a peer or the raw client prints: its JSON result.
  defp result_line!(command, args) do
    {out, status} = System.cmd(command, args, stderr_to_stdout: true)
    if status != 0, do: raise("#{command} #{Enum.join(args, " ")} failed:\n#{out}")
    out |> String.split("\n", trim: true) |> List.last()
  end

  defp reported(line, field) do
    [_, value] = Regex.run(~r/"#{field}":\s*([0-9.]+)/, line)
    String.to_float(value)
  end

  def external!(command, args), do: command |> result_line!(args) |> reported("seconds")

  def raw(args), do: external!(@raw, args)

  # One run of the raw client: `{seconds, CPU seconds}` as it reports them,
  # both from after its first call to the end of its work (the CPU time of
  # all its threads), so neither counts the program's start.
  def raw_measured(args) do
    line = result_line!(@raw, args)
    {reported(line, "seconds"), reported(line, "cpu_seconds")}
  end

  def python(script, args),
    do: external!(@python, [Path.join(@root, "bench/peers/#{script}") | args])

  def queue!(stream, endpoint, opts) do
    id = {:bench, System.unique_integer([:positive])}

    base = [
      stream: stream,
      stream_id: id,
      kinesis: Convoy.Local.kinesis_options(endpoint),
      max_buffered_records: 2_000_000,
      max_buffered_bytes: 1_000_000_000
    ]

    {:ok, pid} = Convoy.Queue.start_link(Keyword.merge(base, opts))
    {id, pid}
  end

  def stop_queue(pid) do
    Process.unlink(pid)
    GenServer.stop(pid, :normal, 60_000)
  end

  # Puts `count` records from `procs` processes; returns when all are accepted.
  # Keys and payloads are built before the clock starts, so only the calls
  # are measured.
  def put_all(id, count, procs) do
    run_parallel(count, procs, fn key, data -> put!(id, key, data) end)
  end

  # Puts `count` records from `procs` processes, each building its records
  # as it goes, as the peers do (no list of payloads to build and collect
  # first); answers the seconds until all are accepted.
  def produce_all(id, count, procs, key_count \\ 64) do
    per = div(count, procs)
    keys = keys(key_count)

    seconds(fn ->
      1..procs
      |> Enum.map(fn p ->
        Task.async(fn ->
          first = (p - 1) * per
          produce(id, keys, first, first + per)
        end)
      end)
      |> Task.await_many(:infinity)
    end)
  end

  # `produce_all/4`, then a flush: answers the seconds until every record
  # was acknowledged.
  def produce_acknowledged(id, count, procs) do
    seconds(fn ->
      produce_all(id, count, procs)
      :ok = Convoy.Queue.flush(id, await: 300_000)
    end)
  end

  defp keys(count \\ 64), do: List.to_tuple(for k <- 0..(count - 1), do: "key-#{k}")

  defp produce(_id, _keys, last, last), do: :ok

  defp produce(id, keys, i, last) do
    put!(id, elem(keys, rem(i, tuple_size(keys))), data(i))
    produce(id, keys, i + 1, last)
  end

  # Runs `put.(key, data)` over `count` records split among `procs`
  # processes. Each process builds its own keys and payloads and collects
  # its garbage before the clock starts, so only the calls are measured
  # (not the building, nor a copy of the payloads between processes).
  def run_parallel(count, procs, put) do
    me = self()

    workers =
      spawn_putters(count, procs, fn records ->
        receive do
          :go -> :ok
        end

        Enum.each(records, fn {key, data} -> put.(key, data) end)
        send(me, {:done, self()})
      end)

    cpu_before = scheduler_ns()

    seconds =
      seconds(fn ->
        Enum.each(workers, &send(&1, :go))
        for w <- workers, do: receive(do: ({:done, ^w} -> :ok))
      end)

    Process.put(:bench_scheduler_ns, scheduler_ns() - cpu_before)
    seconds
  end

  # Spawns `procs` processes, each building its share of `count` records
  # and collecting its garbage, then running `work.(records)`; answers them
  # once all are ready, so that a clock started then times the work alone.
  defp spawn_putters(count, procs, work) do
    per = div(count, procs)
    me = self()

    workers =
      for p <- 1..procs do
        spawn_link(fn ->
          records = payloads((p - 1) * per, per)
          :erlang.garbage_collect()
          send(me, {:ready, self()})
          work.(records)
        end)
      end

    for w <- workers, do: receive(do: ({:ready, ^w} -> :ok))
    workers
  end

  # `put/3` in a steady state: `procs` processes put `count` records in
  # bursts of `burst` records each, all processes together; between bursts,
  # outside the clock, the queue is flushed, so its buffer is sent and
  # reused rather than growing for the whole measure, and a caller never
  # waits for the sending to catch up (which would time the pipeline, not
  # the call). The lanes send each burst's full requests while the burst
  # goes on, on the same cores. Answers the seconds of the bursts; the
  # scheduler CPU they used is `last_scheduler_ns/0`.
  def put_bursts(id, count, procs, burst) do
    me = self()

    workers =
      spawn_putters(count, procs, fn records ->
        put_burst_loop(id, me, Enum.chunk_every(records, burst))
      end)

    per = div(count, procs)
    stats = scheduler_stats()

    {seconds, cpu} =
      Enum.reduce(1..ceil(per / burst), {0.0, 0}, fn _, {seconds, cpu} ->
        cpu_before = scheduler_ns(stats)

        burst_seconds =
          seconds(fn ->
            Enum.each(workers, &send(&1, :go))
            for w <- workers, do: receive(do: ({:done, ^w} -> :ok))
          end)

        cpu = cpu + scheduler_ns(stats) - cpu_before
        :ok = Convoy.Queue.flush(id, await: 60_000)
        {seconds + burst_seconds, cpu}
      end)

    Process.put(:bench_scheduler_ns, cpu)
    seconds
  end

  defp put_burst_loop(_id, _parent, []), do: :ok

  defp put_burst_loop(id, parent, [burst | rest]) do
    receive do
      :go -> :ok
    end

    Enum.each(burst, fn {key, data} -> put!(id, key, data) end)
    send(parent, {:done, self()})
    put_burst_loop(id, parent, rest)
  end

  # The CPU time (ns) the VM's scheduler threads used during the last
  # `run_parallel/3` or `put_bursts/4` (its calls only).
  def last_scheduler_ns, do: Process.get(:bench_scheduler_ns)

  # Section 0 of bench/run.exs, one run: the bytes of resident memory the VM
  # grows by per record while `count` records stay buffered in a queue whose
  # Kinesis is unreachable. `warm` records are put first, outside the
  # measure: they fill the lanes' first requests (in flight, retried) and
  # grow the allocators past their first segments, costs a queue pays once
  # rather than per record held. Records are built as they are put: a list
  # of them built beforehand would be copied by this process's garbage
  # collections meanwhile (about 120 bytes a record, more than Convoy's own
  # share) and that copy would count as held.
  def held_per_record(count, warm) do
    {id, pid} =
      queue!("held", "http://127.0.0.1:9",
        batch_timeout: 600_000,
        max_retries: 1_000,
        retry_deadline: 3_600_000,
        retry_backoff: 60_000,
        max_backoff: 60_000,
        shutdown: 1_000
      )

    keys = keys()
    :ok = produce(id, keys, count, count + warm)
    :erlang.garbage_collect()
    Process.sleep(200)
    before = rss_kb()
    :ok = produce(id, keys, 0, count)
    :erlang.garbage_collect()
    Process.sleep(200)
    grown = (rss_kb() - before) * 1024
    %{buffered: buffered, in_flight: in_flight} = Convoy.Queue.stats(id)
    true = buffered + in_flight == count + warm
    stop_queue(pid)
    grown / count
  end

  # Bytes of key and data of records `first..first + count - 1` as
  # `produce_all/3` and `held_per_record/2` build them.
  def payload_bytes(first, count) do
    keys = keys()

    Enum.reduce(
      first..(first + count - 1),
      0,
      &(&2 + byte_size(elem(keys, rem(&1, 64))) + size())
    )
  end

  # Section 3 of bench/run.exs, one run: Convoy consumes the `count` records
  # of the pre-filled `stream` with one function handler, from
  # `:trim_horizon`. Answers `{seconds, peak_rss_kb, cpu_seconds}`, the CPU
  # time of the whole VM (all its threads, in ns from their schedstat)
  # meanwhile. The handler counts the records with one atomic add each, as
  # little as a handler can do and still know when all are in (the raw loop
  # adds once per batch).
  def consume(stream, endpoint, count) do
    {id, pid} = queue!(stream, endpoint, iterator_type: :trim_horizon, poll_interval: 50)
    counter = :atomics.new(1, signed: false)
    me = self()

    cpu_before = total_thread_ns()

    {seconds, rss} =
      peak_rss(fn ->
        seconds(fn ->
          :ok =
            Convoy.Queue.attach_handler(
              id,
              :count,
              fn _record, _ ->
                if :atomics.add_get(counter, 1, 1) == count, do: send(me, :all_in)
              end,
              nil
            )

          receive do
            :all_in -> :ok
          after
            300_000 -> raise "consumer timed out at #{:atomics.get(counter, 1)}"
          end
        end)
      end)

    cpu = (total_thread_ns() - cpu_before) / 1.0e9
    stop_queue(pid)
    {seconds, rss, cpu}
  end

  # The raw SDK's GetRecords loop reading the same stream, in a process warmed
  # by one read of it beforehand (as `consume/3` is measured in a VM that
  # consumed once): `{seconds, CPU seconds}` of the read measured.
  def raw_get(stream, endpoint, count),
    do: raw_measured(["get", endpoint, stream, "#{count}", "1"])

  def payloads(first, count),
    do: for(i <- first..(first + count - 1), do: {"key-#{rem(i, 64)}", data(i)})

  defp put!(id, key, data) do
    case Convoy.Queue.put(id, key, data) do
      :ok ->
        :ok

      {:error, :overloaded} ->
        Process.sleep(1)
        put!(id, key, data)
    end
  end
end

defmodule Bench.Null do
  # The null endpoint: `convoy_local null` acknowledges every record at once
  # and stores nothing, so what is measured against it is the client alone.
  # It runs as a port of this VM and exits when the VM does.
  def start! do
    bin = Convoy.Local.binary!()

    port =
      Port.open({:spawn_executable, bin}, [
        :binary,
        :exit_status,
        {:line, 1024},
        args: ["null", "--port", "0", "--shards", "4"]
      ])

    receive do
      {^port, {:data, {:eol, "convoy_local null listening on " <> url}}} -> {port, url}
      {^port, {:exit_status, status}} -> raise "convoy_local null exited with #{status}"
    after
      10_000 -> raise "convoy_local null did not start"
    end
  end

  def stop({port, _url}), do: Port.close(port)
end

defmodule Bench.Baseline do
  # The original design: one GenServer that callers cast records to, and
  # that keeps them in a queue until a batch is sent.
  use GenServer
  def start_link, do: GenServer.start_link(__MODULE__, :queue.new())
  def put(pid, key, data), do: GenServer.cast(pid, {:put, key, data})

  def cast_all(pid, count, procs),
    do: Bench.run_parallel(count, procs, fn key, data -> put(pid, key, data) end)

  def size(pid), do: GenServer.call(pid, :size, :infinity)
  @impl true
  def init(queue), do: {:ok, queue}
  @impl true
  def handle_cast({:put, key, data}, queue), do: {:noreply, :queue.in({key, data}, queue)}
  @impl true
  def handle_call(:size, _from, queue), do: {:reply, :queue.len(queue), queue}
end
