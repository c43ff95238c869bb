defmodule Convoy.Services.Kinesis.Producer do
  @moduledoc false
  # Owns a queue's native producer (the batcher lanes in Rust) and registers
  # the queue's handle, so `put/4` reaches the producer without a process hop.
  #
  # The producer lives as long as this process holds it. On a normal stop,
  # `terminate/2` closes it and waits, within the `shutdown` time, for every
  # buffered record to be sent or to fail. If this process is killed, the
  # handle's Registry entry goes with it, and the producer (which monitors
  # this process) closes: its lanes send what they hold and end, and records
  # that finally fail are reported to the queue's `Convoy.Queue.Reporter`,
  # which outlives this process. The reporter also keeps the latest producer,
  # so this process's successor takes puts only once those lanes are done.

  use GenServer

  require Logger

  alias Convoy.Native
  alias Convoy.Queue.Reporter

  # Producer options, passed to Rust under their Convoy.Queue names.
  @native_options [
    :stream,
    :batch_timeout,
    :max_in_flight,
    :ordering,
    :max_buffered_records,
    :max_buffered_bytes,
    :max_record_bytes,
    :max_retries,
    :retry_deadline,
    :retry_backoff,
    :max_backoff,
    :aggregation,
    :aggregation_max_bytes,
    :shard_refresh_interval,
    :shutdown
  ]

  def child_spec({options, _client} = args) do
    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [args]},
      # The shutdown option is the time to send the buffer; a little more
      # lets terminate/2 hear the outcome.
      shutdown: options[:shutdown] + 1_000
    }
  end

  @spec start_link({keyword, reference}) :: GenServer.on_start()
  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl true
  def init({options, client}) do
    Process.flag(:trap_exit, true)
    stream_id = options[:stream_id]
    Convoy.Queue.Topology.await_free(:handle, stream_id)
    reporter = Reporter.whereis(stream_id) || exit(:no_reporter)
    # The reporter may restart alone; the producer is then told its successor.
    Process.monitor(reporter)

    native_options =
      options
      |> Keyword.take(@native_options)
      |> Map.new()
      |> Map.put(:telemetry, Convoy.Telemetry.enabled?())

    producer = Native.producer_start(client, native_options, reporter)
    state = %{stream_id: stream_id, producer: producer, options: options, reporter: reporter}

    case Reporter.latest_producer(reporter) do
      # A successor: it waits for its predecessor without holding up the
      # rest of the tree; puts answer {:error, :closed} meanwhile. Until it
      # registers, the predecessor stays the latest: a successor killed
      # while it waits leaves the next one waiting for the same lanes.
      {:ok, previous} when previous != nil ->
        {:ok, state, {:continue, {:await_predecessor, previous}}}

      # The queue's first producer: it takes puts once start_link returns.
      {:ok, nil} ->
        {:ok, register(state)}

      :error ->
        Logger.warning(
          "Convoy #{inspect(stream_id)}: the reporter did not say which producer this one " <>
            "replaces; taking puts without waiting for it"
        )

        {:ok, register(state)}
    end
  end

  @impl true
  def handle_continue({:await_predecessor, previous}, state) do
    await_predecessor(previous, state.options)
    {:noreply, register(state)}
  end

  defp register(state) do
    _ = Reporter.keep_producer(state.reporter, state.producer)
    handle = %{producer: state.producer, consumer: Convoy.Consumer.name(state.stream_id)}
    :ok = Convoy.Queue.register(state.stream_id, Convoy.Services.Kinesis, handle)
    state
  end

  # The producer this one replaces (its owner was killed, or stopped) still
  # sends what it held, within the shutdown time: puts are taken only once
  # it is done, so a key's records keep their order.
  defp await_predecessor(previous, options) do
    # A little more than the predecessor's own deadline.
    timeout = options[:shutdown] + 1_000

    case Native.call(&Native.producer_await_lanes(previous, timeout, &1), timeout + 1_000) do
      {:ok, true} ->
        :ok

      other ->
        Logger.warning(
          "Convoy #{inspect(options[:stream_id])}: the previous producer still sends " <>
            "after #{timeout} ms (#{inspect(other)}); taking puts anyway"
        )
    end
  end

  @impl true
  def handle_info({:convoy_task_panic, what, message}, state) do
    # A lane that panicked has reported its records as failed and closed the
    # producer; a new one takes over.
    Logger.error("Convoy #{inspect(state.stream_id)}: #{what} panicked: #{message}")
    {:stop, {:producer_panic, message}, state}
  end

  def handle_info({:convoy_put_failed, failures}, state) do
    report(failures, state)
    {:noreply, state}
  end

  # Reports that came here while the reporter was down.
  def handle_info({:convoy_put_records, report}, state) do
    Reporter.put_records(report, state.options[:stream], state.stream_id)
    {:noreply, state}
  end

  def handle_info({:DOWN, _, :process, pid, _}, %{reporter: pid} = state) do
    {:noreply, find_reporter(state)}
  end

  def handle_info(:find_reporter, state), do: {:noreply, find_reporter(state)}

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  # Killed along with the service's supervisor: nothing waits for a graceful
  # close; the producer, which monitors this process, closes and sends what
  # it holds within the shutdown time, reporting to the reporter.
  def terminate(:killed, _state), do: :ok

  def terminate(_reason, state) do
    Convoy.Queue.unregister(state.stream_id)
    # Failures still go to the reporter; they come here only while it is
    # down (it stopped first, or was killed).
    deadline = max(state.options[:shutdown] - 500, 100)
    ref = make_ref()
    :ok = Native.producer_close(state.producer, deadline, {self(), ref})
    await_close(ref, state, deadline + 1_000)
    # The reporter stops right after this process: first it handles the
    # last failure reports the lanes sent it.
    Reporter.sync(state.reporter, 1_000)
  end

  defp await_close(ref, state, timeout) do
    receive do
      {^ref, :ok} ->
        drain_failures(state)

      {:convoy_put_failed, failures} ->
        report(failures, state)
        await_close(ref, state, timeout)

      {:convoy_put_records, report} ->
        Reporter.put_records(report, state.options[:stream], state.stream_id)
        await_close(ref, state, timeout)
    after
      timeout ->
        Logger.error("Convoy #{inspect(state.stream_id)}: producer did not close in time")
    end
  end

  defp drain_failures(state) do
    receive do
      {:convoy_put_failed, failures} ->
        report(failures, state)
        drain_failures(state)

      {:convoy_put_records, report} ->
        Reporter.put_records(report, state.options[:stream], state.stream_id)
        drain_failures(state)
    after
      0 -> :ok
    end
  end

  # The reporter's supervisor starts its successor: until it is registered,
  # reports come here (the producer falls back to its owner).
  defp find_reporter(state) do
    case Reporter.whereis(state.stream_id) do
      pid when is_pid(pid) and pid != state.reporter ->
        Process.monitor(pid)
        :ok = Native.producer_set_reporter(state.producer, pid)
        # The new reporter keeps this producer for this process's successor.
        _ = Reporter.keep_producer(pid, state.producer)
        %{state | reporter: pid}

      _ ->
        Process.send_after(self(), :find_reporter, 10)
        state
    end
  end

  defp report(failures, state),
    do:
      Reporter.report(
        failures,
        state.options[:stream],
        state.stream_id,
        state.options[:on_failure]
      )
end
