defmodule Convoy.Consumer.ShardDispatcher do
  @moduledoc false
  # One process per shard being read. It owns the shard's reader (for
  # Kinesis a native poller, which stops when this process goes), receives
  # each batch the reader sends or hands over (taken in chunks with the
  # source's `take/1`), runs it through the handlers, stores the
  # checkpoint, and only then acknowledges the batch so the reader reads on.
  #
  # It never waits inside a callback for a handler: it is a state machine
  # whose state is `batch` (nil when idle) and, while a batch is in hand,
  # `batch.step` (what it waits for: a pid handler's ack, or the pause before
  # a function handler's retry). Acks, ack timeouts, retries, handler DOWNs,
  # handler changes and `:stop` are all messages, handled in every state.
  # A plain GenServer rather than :gen_statem: there are only two states, and
  # almost every event (stop, handler changes, reader errors) is handled the
  # same in both; each timer carries the token of the wait it belongs to, so
  # a stale one is simply ignored.
  #
  # Handlers see a batch one after another, in attach order: a function
  # handler is called for each record right here; a pid handler is sent
  # `{:convoy_batch, batch}` and the next handler gets the batch only once it
  # acks. Sending to every handler at once would also make the shard read on
  # only after all of them finished, but a handler attached after a pid
  # handler would then see the batch before that one had finished it;
  # sequential delivery keeps attach order a processing order, as it was when
  # the dispatcher blocked on each ack. Between two handlers the dispatcher
  # goes back to its mailbox, so a stop or a detach is never held up by more
  # than the one handler running.
  #
  # The batch is finished when no attached handler still owes it (each one
  # finished it or failed on it; one detached while holding it owes nothing)
  # and at least one of the attached handlers finished it. Otherwise it is
  # neither checkpointed nor acked: it goes to handlers attached later, or,
  # once the last handler is gone and the consumer stops this process, it is
  # read again from the checkpoint (at least once, never skipped). A handler
  # whose partition keys select none of the batch finished it. A batch taken
  # from the reader in chunks is a batch here per chunk; its checkpoint is
  # stored, and the reader acked, once its last chunk is finished.
  #
  # Handlers are known by the `ref` of their attachment, not their id: a
  # handler detached and attached again under the same id is a new handler.
  # Failures are contained here: the handler is logged, marked failed (its
  # attachment gets no further batch) and the consumer is told with
  # `{:handler_failed, id, ref}`, which it ignores when `ref` is stale.

  use GenServer, restart: :temporary

  require Logger

  alias Convoy.Telemetry

  @handler_span [:convoy, :handler]

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  def set_handlers(pid, handlers), do: send(pid, {:handlers, handlers})

  def stop_async(pid), do: send(pid, :stop)

  def stop(pid) do
    GenServer.stop(pid, :normal, 5_000)
  catch
    :exit, _ -> :ok
  end

  @impl true
  def init(args) do
    {module, source} = args.source

    reader =
      module.start_reader(source, args.shard_id, args.position, self(), args.reader_options)

    args = args |> Map.put_new(:stream, args.stream_id) |> Map.put_new(:done_through, nil)

    {:ok,
     Map.merge(args, %{
       reader: reader,
       reader_module: module,
       failed: MapSet.new(),
       batch: nil,
       # From the first take of a batch the reader handed over to `:done`.
       taking: false,
       # The batch read, as far as its chunks are finished, until its
       # checkpoint is stored: `%{position, count, started, millis_behind}`.
       unstored: nil
     })}
  end

  @impl true
  # The reader sends nothing more until it is acked: a batch arrives only
  # when none is in hand.
  #
  # Self-fencing: with leases, a batch waits while the shard's lease is not
  # known to be renewed (the consumer stops this dispatcher if it is lost).
  def handle_info({tag, _, _, _} = message, %{leased: true} = state)
      when tag in [:convoy_records, :convoy_records_ready, :convoy_next_chunk] do
    if Convoy.Leases.may_dispatch?(state.stream_id, state.shard_id) do
      handle_records(message, state)
    else
      Process.send_after(self(), message, 100)
      {:noreply, state}
    end
  end

  def handle_info({tag, _, _, _} = message, state)
      when tag in [:convoy_records, :convoy_records_ready, :convoy_next_chunk],
      do: handle_records(message, state)

  def handle_info(:advance, state), do: {:noreply, advance(state)}

  # One GetRecords call (or fan-out event), reported by the reader only when
  # telemetry is on; it comes before the batch it read.
  def handle_info({:convoy_get_records, _shard_id, call}, state) do
    metadata = %{stream: state.stream, stream_id: state.stream_id, shard_id: state.shard_id}
    measurements = %{count: call.count, millis_behind_latest: call.millis_behind_latest}
    metadata = Map.put(metadata, :next_iterator, call.next_iterator)
    Telemetry.reported([:convoy, :get_records], call.duration, measurements, metadata, call.error)

    if is_nil(call.error) do
      Telemetry.execute([:convoy, :queue, :records_received], %{count: call.count}, metadata)
    end

    {:noreply, state}
  end

  def handle_info({:convoy_ack, token}, %{batch: %{step: %{wait: :ack, token: token}}} = state) do
    step = state.batch.step
    Telemetry.stop(@handler_span, step.span, %{count: length(step.records)})
    {handler, state} = end_step(state)
    {:noreply, state |> handler_done(handler, :finished) |> advance()}
  end

  # A partial ack: the first `count` records are done, the rest failed.
  def handle_info(
        {:convoy_ack, token, count},
        %{batch: %{step: %{wait: :ack, token: token}}} = state
      ) do
    %{records: records, attempt: attempt, span: span} = state.batch.step
    {handler, state} = end_step(state)

    case Enum.drop(records, count) do
      [] ->
        Telemetry.stop(@handler_span, span, %{count: length(records)})
        {:noreply, state |> handler_done(handler, :finished) |> advance()}

      rest ->
        {:noreply, pid_failed(handler, rest, attempt, :exit, :partial_ack, state, span)}
    end
  end

  def handle_info(
        {:convoy_nack, token, reason},
        %{batch: %{step: %{wait: :ack, token: token}}} = state
      ) do
    %{records: records, attempt: attempt, span: span} = state.batch.step
    {handler, state} = end_step(state)
    {:noreply, pid_failed(handler, records, attempt, :exit, {:nack, reason}, state, span)}
  end

  # A handler that died cannot be retried: it is detached, whatever its policy.
  def handle_info(
        {:DOWN, monitor, :process, _pid, reason},
        %{batch: %{step: %{wait: :ack, monitor: monitor}}} = state
      ) do
    %{records: [record | _], span: span} = state.batch.step

    Telemetry.exception(@handler_span, span, :exit, {:handler_down, reason}, [], %{detached: true})

    {handler, state} = end_step(state)
    failure(state, handler, :exit, {:handler_down, reason}, :detach, record)
    {:noreply, state |> handler_failed(handler, :exit, {:handler_down, reason}, []) |> advance()}
  end

  def handle_info({:ack_timeout, token}, %{batch: %{step: %{wait: :ack, token: token}}} = state) do
    %{records: records, attempt: attempt, span: span} = state.batch.step
    {handler, state} = end_step(state)
    {:noreply, pid_failed(handler, records, attempt, :exit, :ack_timeout, state, span)}
  end

  def handle_info({:retry, token}, %{batch: %{step: %{wait: :retry, token: token}}} = state) do
    %{records: records, attempt: attempt} = state.batch.step
    {handler, state} = end_step(state)

    if is_pid(handler.handler),
      do: {:noreply, send_batch(handler, records, attempt, state)},
      else: {:noreply, run_function(handler, records, attempt, state)}
  end

  def handle_info({:handlers, handlers}, state) do
    refs = MapSet.new(handlers, & &1.ref)
    state = %{state | handlers: handlers, failed: MapSet.intersection(state.failed, refs)}

    state =
      case state.batch do
        %{step: %{handler: ref} = step} ->
          cond do
            # The handler holding the batch was detached: it goes on without it.
            not MapSet.member?(refs, ref) ->
              if step[:span] do
                Telemetry.exception(@handler_span, step.span, :exit, :detached, [], %{
                  detached: true
                })
              end

              state |> end_step() |> elem(1) |> put_done(ref)

            # A shard halted on a handler's failure tries that record again.
            step.wait == :halted ->
              {handler, state} = end_step(state)
              log_resume(state, handler)
              retry(handler, step.records, 1, state)

            true ->
              state
          end

        _ ->
          state
      end

    # A pending batch may now go on: its holder left, or handlers came.
    {:noreply, advance(state)}
  end

  def handle_info({:convoy_shard_end, shard_id}, state),
    do: handle_info({:convoy_shard_end, shard_id, []}, state)

  # `children`: the shards that continue this one, when the reader was told.
  def handle_info({:convoy_shard_end, _shard_id, children}, state) do
    {module, checkpoint} = state.checkpoint
    :ok = module.store(checkpoint, state.stream_id, state.shard_id, :shard_end)
    send(state.consumer, {:shard_ended, state.shard_id, children})
    # Nothing finished may be stored over SHARD_END at the stop.
    {:stop, :normal, %{state | unstored: nil}}
  end

  def handle_info({:convoy_unparseable, shard_id, records}, state) do
    Convoy.Consumer.Source.report_unparseable(state.stream, state.stream_id, shard_id, records)
    {:noreply, state}
  end

  def handle_info({:convoy_poller_error, _shard_id, reason}, state) do
    reader_error(:warning, "reading #{state.shard_id}", reason, state)
    {:noreply, state}
  end

  def handle_info({:convoy_poller_stopped, _shard_id, reason}, state) do
    # The reader gave up on an error retrying cannot cure. Stopping lets the
    # consumer start this shard again from its checkpoint, after a pause.
    reader_error(:error, "reading #{state.shard_id} stopped", reason, state)
    {:stop, {:reader_stopped, reason}, state}
  end

  def handle_info({:convoy_task_panic, what, message}, state) do
    Logger.error(
      "Convoy #{inspect(state.stream_id)}: #{what} of #{state.shard_id} panicked: #{message}"
    )

    {:stop, {:poller_panic, message}, state}
  end

  # `terminate/2` finishes what it can of the batch in hand and stores the
  # checkpoint of what was finished; the rest is read again from it by the
  # shard's next dispatcher.
  def handle_info(:stop, state), do: {:stop, :normal, state}

  # Stale acks, timeouts and retries of waits that already ended.
  def handle_info(_other, state), do: {:noreply, state}

  # A reader that hands batches over: taken here in chunks, so that the
  # records are built on this process's heap and it holds one chunk at a
  # time. Each chunk goes through the handlers as a batch of its own; when
  # one is finished this process asks itself for the next one (so a stop, a
  # detach or a lost lease is seen between chunks), and once none is left it
  # stores the checkpoint and acks the reader.
  #
  # While a batch is being taken, an announcement from the reader means an
  # extra acknowledgement let it read ahead: the records it read wait in the
  # handover behind the batch's, and the next take finds them.
  defp handle_records({:convoy_records_ready, _, _, _}, %{taking: true} = state),
    do: {:noreply, state}

  defp handle_records({tag, shard_id, _count, millis_behind}, state)
       when tag in [:convoy_records_ready, :convoy_next_chunk] do
    case state.reader_module.take(state.reader) do
      :done ->
        {:noreply, store_checkpoint(%{state | taking: false})}

      {records, unparseable} ->
        Convoy.Consumer.Source.report_unparseable(
          state.stream,
          state.stream_id,
          shard_id,
          unparseable
        )

        start_batch(records, millis_behind, %{state | taking: true})
    end
  end

  defp handle_records({:convoy_records, _shard_id, records, millis_behind}, state),
    do: start_batch(records, millis_behind, state)

  defp start_batch(records, millis_behind, state) do
    started = System.monotonic_time()
    {records, state} = drop_done(records, state)

    case records do
      [] ->
        # Nothing to hand out and no sequence number to store.
        {:noreply, batch_done(millis_behind, state)}

      records ->
        batch = %{
          records: records,
          millis_behind: millis_behind,
          started: started,
          # Attachment refs through with this batch (finished it, failed on
          # it, or detached while holding it), and those that finished it.
          done: MapSet.new(),
          finished: MapSet.new(),
          step: nil
        }

        {:noreply, advance(%{state | batch: batch})}
    end
  end

  # A batch (or chunk) is through: while the batch is being taken, take the
  # next chunk (`:done` ends it); else store its checkpoint and ack the
  # reader.
  defp batch_done(millis_behind, %{taking: true} = state) do
    send(self(), {:convoy_next_chunk, state.shard_id, 0, millis_behind})
    state
  end

  defp batch_done(_millis_behind, state), do: store_checkpoint(state)

  # Stores the checkpoint of what was finished, if anything, and acks the
  # reader.
  defp store_checkpoint(state) do
    state = store_finished(state)
    state.reader_module.ack(state.reader)
    state
  end

  defp store_finished(%{unstored: nil} = state), do: state

  defp store_finished(%{unstored: unstored} = state) do
    {module, checkpoint} = state.checkpoint
    :ok = module.store(checkpoint, state.stream_id, state.shard_id, unstored.position)

    if Telemetry.enabled?() do
      Telemetry.execute(
        [:convoy, :batch, :stop],
        %{
          count: unstored.count,
          duration: System.monotonic_time() - unstored.started,
          millis_behind_latest: unstored.millis_behind
        },
        %{stream: state.stream, stream_id: state.stream_id, shard_id: state.shard_id}
      )
    end

    %{state | unstored: nil}
  end

  # A shard started at a checkpoint inside an aggregated record reads that
  # record again: its user records up to the checkpoint's sub-sequence
  # number are dropped from the first batch that brings any record.
  defp drop_done(records, %{done_through: {_, _} = done} = state) when records != [] do
    {Convoy.Checkpoint.drop_processed(records, done), %{state | done_through: nil}}
  end

  defp drop_done(records, state), do: {records, state}

  @impl true
  def terminate(reason, state) do
    state =
      if reason == :normal or reason == :shutdown or match?({:shutdown, _}, reason),
        do: finish_in_flight(state, length(state.handlers) + 1),
        else: state

    # Chunks every handler finished are not handled again, whatever the stop.
    store_finished(state)

    state.reader_module.stop_reader(state.reader)
  end

  # A stop that arrives while a batch is in hand (before the message that
  # would finish it): finish it now, so that its checkpoint is stored (with
  # the chunks of the batch finished before it) and the shard's next reader
  # (another node, with leases) does not handle it again. Only function
  # handlers run here; a batch waiting on a process's ack or a retry is
  # left, and read again from the checkpoint.
  defp finish_in_flight(%{batch: nil} = state, _), do: state
  defp finish_in_flight(%{batch: %{step: step}} = state, _) when step != nil, do: state
  defp finish_in_flight(state, 0), do: state

  defp finish_in_flight(state, budget) do
    finish_in_flight(advance(state), budget - 1)
  end

  # ---------------------------------------------------------------------------
  # The batch in hand

  # Hands the batch to the next handler that still owes it, or finishes it.
  defp advance(%{batch: nil} = state), do: state
  defp advance(%{batch: %{step: step}} = state) when step != nil, do: state

  defp advance(state) do
    case Enum.find(state.handlers, &owes?(state, &1)) do
      nil -> finish(state)
      handler -> run(handler, state)
    end
  end

  defp owes?(state, handler),
    do:
      not MapSet.member?(state.batch.done, handler.ref) and
        not MapSet.member?(state.failed, handler.ref)

  defp finish(%{batch: batch} = state) do
    if Enum.any?(state.handlers, &MapSet.member?(batch.finished, &1.ref)),
      do: batch_finished(state),
      # No attached handler finished it: wait for handlers, or for :stop.
      else: state
  end

  # The batch in hand is finished: its position waits to be stored.
  defp batch_finished(%{batch: batch} = state) do
    # A user record of an aggregated record: with its sub-sequence number.
    position =
      case List.last(batch.records) do
        %{sub_sequence_number: nil, sequence_number: sequence} -> sequence
        %{sub_sequence_number: sub, sequence_number: sequence} -> {sequence, sub}
      end

    # Counted for telemetry only: not walked again when it is off.
    count = if Telemetry.enabled?(), do: length(batch.records), else: 0

    earlier = state.unstored || %{count: 0, started: batch.started}

    unstored =
      Map.merge(earlier, %{
        position: position,
        count: earlier.count + count,
        millis_behind: batch.millis_behind
      })

    batch_done(batch.millis_behind, %{state | batch: nil, unstored: unstored})
  end

  defp run(handler, state) do
    case select(state.batch.records, handler.opts[:partition_keys]) do
      [] -> advance(handler_done(state, handler, :finished))
      records -> retry(handler, records, 1, state)
    end
  end

  # Hands `records` to the handler, as its attempt number `attempt`.
  defp retry(handler, records, attempt, state) when is_pid(handler.handler),
    do: send_batch(handler, records, attempt, state)

  defp retry(handler, records, attempt, state),
    do: run_function(handler, records, attempt, state)

  defp select(records, nil), do: records

  defp select(records, key) when is_binary(key),
    do: Enum.filter(records, &(&1.partition_key == key))

  defp select(records, keys) when is_list(keys),
    do: Enum.filter(records, &(&1.partition_key in keys))

  defp select(records, fun) when is_function(fun, 1),
    do: Enum.filter(records, &fun.(&1.partition_key))

  defp send_batch(%{handler: pid} = handler, records, attempt, state) do
    token = make_ref()
    monitor = Process.monitor(pid)

    batch = %Convoy.Batch{
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id,
      records: records,
      ref: token,
      dispatcher: self()
    }

    span = Telemetry.start(@handler_span, handler_metadata(state, handler))
    send(pid, {:convoy_batch, batch})

    timer =
      case Keyword.get(handler.opts, :ack_timeout, :infinity) do
        :infinity -> nil
        ms -> Process.send_after(self(), {:ack_timeout, token}, ms)
      end

    step = %{
      wait: :ack,
      handler: handler.ref,
      token: token,
      monitor: monitor,
      timer: timer,
      records: records,
      attempt: attempt,
      span: span
    }

    put_step(state, step)
  end

  # A pid handler nacked `records`, acked only the records before them, or
  # missed its ack timeout: its policy decides.
  defp pid_failed(handler, records, attempt, kind, reason, state, span) do
    final = policy_after(handler, attempt)
    detached = %{detached: final == :detach}
    Telemetry.exception(@handler_span, span, kind, reason, [], detached)

    case final do
      :retry ->
        wait_retry(handler, records, attempt + 1, state)

      final ->
        state
        |> give_up(handler, records, final, kind, reason, [], attempt)
        |> advance()
    end
  end

  # Calls a function handler for each record; a failed call with attempts
  # left waits for its retry as a message, not in a sleep. `attempt` is the
  # attempt number of the first record.
  defp run_function(handler, records, attempt, state) do
    span = Telemetry.start(@handler_span, handler_metadata(state, handler))

    case call_each(handler.handler, handler.config, records, attempt) do
      :ok ->
        # `length/1` walks the batch: only when the span is emitted.
        if span, do: Telemetry.stop(@handler_span, span, %{count: length(records)})
        # Back to the mailbox before the next handler.
        send(self(), :advance)
        handler_done(state, handler, :finished)

      {:failed, records, attempt, kind, reason, stack} ->
        final = policy_after(handler, attempt)
        detached = %{detached: final == :detach}
        Telemetry.exception(@handler_span, span, kind, reason, stack, detached)

        case final do
          :retry ->
            wait_retry(handler, records, attempt + 1, state)

          final ->
            case give_up(state, handler, records, final, kind, reason, stack, attempt) do
              # The dead-letter function took the record: on with the rest.
              %{batch: %{step: nil}} = state when final != :detach ->
                run_function(handler, tl(records), 1, state)

              state ->
                send(self(), :advance)
                state
            end
        end
    end
  end

  # The function and its config are taken out of the handler once per
  # batch, not per record.
  defp call_each(_fun, _config, [], _attempt), do: :ok

  defp call_each(fun, config, [record | rest] = records, attempt) do
    case call(fun, config, record) do
      :ok -> call_each(fun, config, rest, 1)
      {kind, reason, stack} -> {:failed, records, attempt, kind, reason, stack}
    end
  end

  defp call(fun, config, record) do
    fun.(record, config)
    :ok
  catch
    kind, reason -> {kind, reason, __STACKTRACE__}
  end

  defp wait_retry(handler, records, attempt, state) do
    token = make_ref()
    # 100 ms, 200 ms, 400 ms ... up to 5 s.
    delay = min(100 * Integer.pow(2, min(attempt - 2, 6)), 5_000)
    timer = Process.send_after(self(), {:retry, token}, delay)

    put_step(state, %{
      wait: :retry,
      handler: handler.ref,
      token: token,
      timer: timer,
      records: records,
      attempt: attempt
    })
  end

  # What the handler's `on_error` says after `attempt` failed attempts:
  # `:retry`, or the final action `:detach`, `:halt` or `{:dead_letter, fun}`.
  defp policy_after(handler, attempt) do
    case Keyword.get(handler.opts, :on_error, :detach) do
      :retry -> :retry
      {:retry, n} when attempt < n -> :retry
      {:retry, _n} -> :detach
      {:retry, n, _then} when attempt < n -> :retry
      {:retry, _n, then} -> then
      final -> final
    end
  end

  # The final action on `records` (what is left of the handler's share of
  # the batch, from the record that failed). Returns the state with the
  # handler detached, the shard halted (a `:halted` step holding the
  # records), or, with a dead-letter function that took the failed records
  # (all of a pid handler's; the first of a function handler's, which goes
  # on with the rest), the state as it was.
  defp give_up(state, handler, records, final, kind, reason, stack, attempts) do
    failure(state, handler, kind, reason, final, hd(records))

    case final do
      :detach ->
        handler_failed(state, handler, kind, reason, stack)

      :halt ->
        halt(state, handler, records, kind, reason, stack)

      {:dead_letter, fun} ->
        info = %{handler_id: handler.id, kind: kind, reason: reason, attempts: attempts}

        dead = if is_pid(handler.handler), do: records, else: [hd(records)]

        case dead_letter(fun, dead, info) do
          :ok when is_pid(handler.handler) ->
            handler_done(state, handler, :finished)

          :ok ->
            state

          {kind, reason, stack} ->
            Logger.error(
              "Convoy #{inspect(state.stream_id)}: the dead-letter function of handler " <>
                "#{inspect(handler.id)} failed:\n" <> Exception.format(kind, reason, stack)
            )

            halt(state, handler, records, kind, reason, stack)
        end
    end
  end

  defp dead_letter(fun, records, info) do
    Enum.each(records, &fun.(&1, info))
  catch
    kind, reason -> {kind, reason, __STACKTRACE__}
  end

  # The shard stops at the record: no checkpoint past it and no further
  # read, until the handlers change (then the record is tried again) or the
  # queue restarts (then the batch is read again from the checkpoint).
  defp halt(state, handler, records, kind, reason, stack) do
    record = hd(records)

    Logger.error(
      "Convoy #{inspect(state.stream_id)}: handler #{inspect(handler.id)} failed on " <>
        "#{state.shard_id} at sequence number #{record.sequence_number}; the shard is halted " <>
        "there until the handlers change or the queue restarts:\n" <>
        Exception.format(kind, reason, stack)
    )

    Telemetry.execute([:convoy, :shard, :halted], %{count: 1}, %{
      stream: state.stream,
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id,
      sequence_number: record.sequence_number,
      reason: reason
    })

    put_step(state, %{wait: :halted, handler: handler.ref, timer: nil, records: records})
  end

  defp log_resume(state, handler) do
    Logger.info(
      "Convoy #{inspect(state.stream_id)}: handlers changed; #{state.shard_id} resumes " <>
        "with handler #{inspect(handler.id)}"
    )
  end

  defp handler_metadata(state, handler) do
    %{
      stream: state.stream,
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id
    }
  end

  # The final failure of a handler on a record (after any retries), with
  # the action taken; the handler span's `:exception` event reports every
  # failed call.
  defp failure(state, handler, kind, reason, action, record) do
    Telemetry.execute([:convoy, :handler, :failed], %{count: 1}, %{
      stream: state.stream,
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      handler_id: handler.id,
      kind: kind,
      reason: reason,
      action: action_name(action),
      sequence_number: record.sequence_number
    })
  end

  defp action_name({:dead_letter, _}), do: :dead_letter
  defp action_name(action), do: action

  defp put_step(state, step), do: %{state | batch: %{state.batch | step: step}}

  # Ends the current wait: cancels its timer and monitor. Returns the handler
  # it was for (nil if it is no longer attached) and the state without it.
  defp end_step(%{batch: %{step: step} = batch} = state) do
    if step.timer, do: Process.cancel_timer(step.timer)
    if step[:monitor], do: Process.demonitor(step.monitor, [:flush])
    handler = Enum.find(state.handlers, &(&1.ref == step.handler))
    {handler, %{state | batch: %{batch | step: nil}}}
  end

  defp put_done(state, ref),
    do: %{state | batch: %{state.batch | done: MapSet.put(state.batch.done, ref)}}

  defp handler_done(state, handler, :finished) do
    state = put_done(state, handler.ref)
    %{state | batch: %{state.batch | finished: MapSet.put(state.batch.finished, handler.ref)}}
  end

  defp handler_failed(state, handler, kind, reason, stack) do
    Logger.error(
      "Convoy #{inspect(state.stream_id)}: handler #{inspect(handler.id)} failed on #{state.shard_id} " <>
        "and is detached:\n" <> Exception.format(kind, reason, stack)
    )

    send(state.consumer, {:handler_failed, handler.id, handler.ref})
    state = put_done(state, handler.ref)
    %{state | failed: MapSet.put(state.failed, handler.ref)}
  end

  defp reader_error(level, what, reason, state) do
    Logger.log(level, "Convoy #{inspect(state.stream_id)}: #{what}: #{inspect(reason)}")

    Telemetry.execute([:convoy, :poller, :error], %{count: 1}, %{
      stream: state.stream,
      stream_id: state.stream_id,
      shard_id: state.shard_id,
      reason: reason
    })
  end
end
