defmodule Convoy.Consumer do
  @moduledoc """
  The consuming half of a queue, the same for every service: handlers, one
  dispatcher process per shard, acknowledgements, checkpoints and the order
  of shards after resharding. A service provides the reading through
  `Convoy.Consumer.Source` and starts one consumer per queue.

  Polling starts when the first handler is attached (if the queue has a
  `poll_interval`) and stops when the last one is detached. Positions live in
  the checkpoint store, so stopping and starting again leaves no gap.

  A consumer is a small tree (`Convoy.Consumer.Supervisor`): a
  `DynamicSupervisor` with one `Convoy.Consumer.ShardDispatcher` per shard
  being read, and the consumer process itself, named
  `Convoy.Consumer.name(stream_id)`. Inside a queue, its handlers are also
  kept in the queue's `Convoy.Consumer.Handlers` store, so they survive a
  restart of the consumer.

  ## Example

      {:ok, _tree} =
        Convoy.Consumer.start_link(
          stream_id: "events",
          source: {Convoy.Services.Memory.Source, memory},
          checkpoint: {Convoy.Checkpoint.Memory, []},
          iterator_type: :trim_horizon,
          poll_interval: 100
        )

      :ok = Convoy.Consumer.attach(Convoy.Consumer.name("events"), :log, fn r, _ -> IO.inspect(r) end, nil, [])
  """
  use GenServer

  require Logger

  alias Convoy.Consumer.ShardDispatcher

  @doc """
  Starts a consumer. Options: `:stream_id`, `:source` (`{module, source}`),
  `:checkpoint` (`{module, options}`), `:iterator_type`, `:poll_interval`,
  `:poll_limit`, `:shard_refresh_interval`, `:retry_backoff`, `:max_backoff`
  (see `Convoy.Queue.start_link/1`), and `:restart_reset_after`.

  A shard dispatcher that exits abnormally is started again from the
  shard's checkpoint after 1 s, then 2 s, 4 s ... up to 60 s if it keeps
  dying. As with a supervisor's restart intensity, only recent failures
  count: a dispatcher that ran `:restart_reset_after` ms (default 60_000)
  before it died is started again after 1 s.

  ## Example

      Convoy.Consumer.start_link(stream_id: "events", source: {MySource, state}, checkpoint: {Convoy.Checkpoint.Memory, []})
  """
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(options), do: Convoy.Consumer.Supervisor.start_link(options)

  @doc """
  A child spec for the consumer's tree; options as for `start_link/1`.

  ## Example

      children = [{Convoy.Consumer, stream_id: "events", source: {MySource, state}}]
  """
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(options) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [options]}, type: :supervisor}
  end

  @doc """
  The name the consumer process of `stream_id` is registered under; every
  function of this module takes it.

  ## Example

      Convoy.Consumer.detach(Convoy.Consumer.name("events"), :log)
  """
  @spec name(term) :: GenServer.name()
  def name(stream_id), do: Convoy.Queue.Topology.name(__MODULE__, stream_id)

  @doc false
  # Started by Convoy.Consumer.Supervisor, after the handler store and the
  # dispatchers' supervisor.
  def start_server(options) do
    GenServer.start_link(__MODULE__, options, name: name(Keyword.fetch!(options, :stream_id)))
  end

  # A consumer restarting (or stopping) answers `{:error, :closed}`.
  defp call(consumer, request, timeout \\ 5_000) do
    GenServer.call(consumer, request, timeout)
  catch
    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] -> {:error, :closed}
    :exit, {{:shutdown, _}, _} -> {:error, :closed}
  end

  @queue_options [
    :stream,
    :stream_id,
    :checkpoint,
    :iterator_type,
    :poll_interval,
    :poll_limit,
    :shard_refresh_interval,
    :retry_backoff,
    :max_backoff,
    :handlers,
    :consumer,
    :leases,
    :kinesis
  ]

  @doc """
  The consumer's share of validated `Convoy.Queue` options.

  ## Example

      Convoy.Consumer.start_link(Convoy.Consumer.queue_options(options) ++ [source: {MySource, state}])
  """
  @spec queue_options(keyword) :: keyword
  def queue_options(options) do
    Keyword.take(options, @queue_options)
  end

  @doc """
  Adds a handler; see `Convoy.Queue.attach_handler/5`.

  ## Example

      :ok = Convoy.Consumer.attach(consumer, :log, fn record, _ -> IO.inspect(record) end, nil, [])
  """
  @spec attach(GenServer.server(), term, Convoy.Queue.handler(), term, keyword) ::
          :ok | {:error, :already_exists}
  def attach(consumer, id, handler, config, opts),
    do: call(consumer, {:attach, id, handler, config, opts})

  @doc """
  Removes a handler.

  ## Example

      :ok = Convoy.Consumer.detach(consumer, :log)
  """
  @spec detach(GenServer.server(), term) :: :ok | {:error, :not_found}
  def detach(consumer, id), do: call(consumer, {:detach, id})

  @doc """
  Pull read; see `Convoy.Queue.get/2`.

  ## Example

      records = Convoy.Consumer.get(consumer, 100)
  """
  @spec get(GenServer.server(), pos_integer) :: [Convoy.Record.t()] | {:error, term}
  # No timeout of its own: the pull ends itself (see @pull_budget_ms), and
  # a caller that gave up waiting would lose records already checkpointed.
  def get(consumer, limit), do: call(consumer, {:get, limit}, :infinity)

  @reader_options [:poll_interval, :poll_limit, :retry_backoff, :max_backoff]

  @restart_reset_after 60_000

  @impl true
  def init(options) do
    # Options left out take Convoy.Queue's defaults, defined once there.
    options =
      Keyword.merge(Keyword.take(Convoy.Queue.Options.defaults(), @queue_options), options)

    Process.flag(:trap_exit, true)

    stream_id = Keyword.fetch!(options, :stream_id)
    checkpoint = init_checkpoint(stream_id, options[:checkpoint])
    # Not reading yet: the lease coordinator takes nothing until polling starts.
    if options[:leases], do: Convoy.Leases.set_consuming(stream_id, false)
    stop_orphan_dispatchers(stream_id)
    {handlers, next_order} = init_handlers(stream_id, options[:handlers])

    # Under :latest the shards' first positions are resolved at once.
    if options[:iterator_type] == :latest, do: send(self(), :pin)

    {:ok,
     %{
       stream_id: stream_id,
       # The stream's name, for telemetry metadata.
       stream: Keyword.get(options, :stream, stream_id),
       source: Keyword.fetch!(options, :source),
       checkpoint: checkpoint,
       iterator_type: options[:iterator_type],
       poll_interval: options[:poll_interval],
       # Pushed readers (enhanced fan-out) need no poll_interval to run.
       pushed: match?({:fan_out, _}, options[:consumer]),
       # Readers run only while polling, so poll_interval is set then.
       reader_options: Map.new(Keyword.take(options, @reader_options)),
       shard_refresh_interval: options[:shard_refresh_interval],
       # With leases, only the shards this node holds are read.
       leased: options[:leases] != nil,
       # shard id => coordinator waiting for that shard to stop
       handing_over: %{},
       handlers: handlers,
       next_order: next_order,
       store_monitor: watch_handler_store(stream_id),
       shards: %{},
       ended: MapSet.new(),
       # Pull reads: per shard cursors and records not yet returned, and the
       # shard the next get/2 starts with.
       pull: %{},
       pull_turn: 0,
       dispatchers: %{},
       stopping: %{},
       # shard id => dispatchers that died in a row, each younger than
       # restart_reset_after; pid => when that dispatcher started (ms).
       restarts: %{},
       dispatcher_since: %{},
       restart_reset_after: Keyword.get(options, :restart_reset_after, @restart_reset_after),
       polling: false,
       refresh_ref: nil,
       # The shard listing in flight (a task's ref), and whether another
       # was asked for meanwhile.
       listing: nil,
       listing_sent: nil,
       relist: false,
       started_at: System.system_time(:millisecond),
       # Whether the shards' first positions were resolved (see pin_shards/1).
       pinned: options[:iterator_type] != :latest,
       pin_failures: 0
     }}
  end

  defp init_checkpoint(stream_id, checkpoint) do
    {module, options} =
      case checkpoint do
        {module, options} -> {module, options}
        module -> {module, []}
      end

    {:ok, store} = module.init([{:stream_id, stream_id} | options])
    {module, store}
  end

  # Handlers given at start are attached after init, so a slow or
  # unreachable endpoint never holds up the queue's start. A consumer
  # restarted alone takes over the handlers its predecessor had.
  defp init_handlers(stream_id, initial) do
    case Convoy.Consumer.Handlers.fetch(stream_id) do
      nil ->
        send(self(), {:attach_initial, initial})
        {%{}, 0}

      {handlers, next_order} ->
        # The monitors were the predecessor's.
        handlers = Map.new(handlers, fn {id, entry} -> {id, remonitor(entry)} end)
        send(self(), :resume)
        {handlers, next_order}
    end
  end

  @impl true
  # The reply goes before polling starts: listing shards is a network call,
  # and a slow endpoint must not time out the caller.
  def handle_call({:attach, id, handler, config, opts}, _from, state) do
    case add_handler(state, id, handler, config, opts) do
      {:ok, state} -> {:reply, :ok, state, {:continue, :update_polling}}
      error -> {:reply, error, state}
    end
  end

  def handle_call({:detach, id}, _from, state) do
    if Map.has_key?(state.handlers, id) do
      {:reply, :ok, remove_handler(state, id)}
    else
      {:reply, {:error, :not_found}, state}
    end
  end

  def handle_call({:get, _limit}, _from, %{polling: true} = state) do
    {:reply, {:error, :polling}, state}
  end

  # Leases are taken only while handlers read, so a pull would hold none.
  def handle_call({:get, _limit}, _from, %{leased: true} = state) do
    {:reply, {:error, :leases}, state}
  end

  def handle_call({:get, limit}, _from, state) do
    case list_shards(state) do
      {:ok, state} ->
        {reply, state} = pull(state, limit)
        {:reply, reply, state}

      {:error, reason} ->
        {:reply, {:error, reason}, state}
    end
  end

  @impl true
  def handle_continue(:update_polling, state), do: {:noreply, update_polling(state)}

  @impl true
  def handle_info(:resume, state), do: {:noreply, update_polling(state)}

  def handle_info(:pin, state), do: {:noreply, refresh(state)}

  # The handler store went down: fill the new one once it is back.
  def handle_info({:DOWN, ref, :process, _pid, _reason}, %{store_monitor: ref} = state) do
    send(self(), :store_handlers)
    {:noreply, %{state | store_monitor: nil}}
  end

  def handle_info(:store_handlers, state) do
    case watch_handler_store(state.stream_id) do
      nil ->
        Process.send_after(self(), :store_handlers, 50)
        {:noreply, state}

      ref ->
        {:noreply, store_handlers(%{state | store_monitor: ref})}
    end
  end

  def handle_info({:attach_initial, handlers}, state) do
    state =
      Enum.reduce(handlers, state, fn {id, handler, config, opts}, state ->
        case add_handler(state, id, handler, config, opts) do
          {:ok, state} -> state
          {:error, :already_exists} -> state
        end
      end)

    {:noreply, update_polling(state)}
  end

  def handle_info({:shard_ended, shard_id}, state),
    do: handle_info({:shard_ended, shard_id, []}, state)

  # The children a reader was told of at the shard's end (enhanced fan-out:
  # the last event's ChildShards) start at once. Without them, or when they
  # do not say every parent, the shards are listed: children appear in the
  # shard list once their parent closed.
  def handle_info({:shard_ended, shard_id, children}, state) do
    state =
      if end_stored?(state, shard_id),
        do: %{state | ended: MapSet.put(state.ended, shard_id)},
        else: state

    case learn_children(state, shard_id, children) do
      {:ok, state} -> {:noreply, start_shards(state, readable_shards(state))}
      :error -> {:noreply, refresh(state)}
    end
  end

  # Only about the attachment the dispatcher saw: a notice that arrives
  # after the id was detached and attached again is about the old handler.
  def handle_info({:handler_failed, id, ref}, state) do
    case state.handlers do
      %{^id => %{ref: ^ref}} -> {:noreply, remove_handler(state, id)}
      _ -> {:noreply, state}
    end
  end

  # The lease coordinator took or lost leases: read what is held, stop the rest.
  def handle_info(:leases_changed, %{polling: true} = state) do
    lost = for {shard_id, _} <- state.dispatchers, not held?(state, shard_id), do: shard_id

    stopping =
      Enum.reduce(lost, state.stopping, fn shard_id, acc ->
        pid = Map.fetch!(state.dispatchers, shard_id)
        ShardDispatcher.stop_async(pid)
        Map.put(acc, pid, shard_id)
      end)

    state = %{state | dispatchers: Map.drop(state.dispatchers, lost), stopping: stopping}
    state = start_shards(state, readable_shards(state))

    # A shard held but not listed yet (a child of a split): list again.
    if Enum.any?(Convoy.Leases.held(state.stream_id), &(not Map.has_key?(state.shards, &1))),
      do: {:noreply, refresh(state)},
      else: {:noreply, state}
  end

  def handle_info(:leases_changed, state), do: {:noreply, state}

  # The lease coordinator hands a shard over to another node: stop it (its
  # batch in flight finished and checkpointed), then tell the coordinator.
  def handle_info({:stop_shard, shard_id, coordinator}, state) do
    state = %{state | handing_over: Map.put(state.handing_over, shard_id, coordinator)}

    case state.dispatchers do
      %{^shard_id => pid} ->
        ShardDispatcher.stop_async(pid)

        {:noreply,
         %{
           state
           | dispatchers: Map.delete(state.dispatchers, shard_id),
             stopping: Map.put(state.stopping, pid, shard_id)
         }}

      _ ->
        if shard_id in Map.values(state.stopping),
          do: {:noreply, state},
          else: {:noreply, handed_over(state, shard_id)}
    end
  end

  def handle_info(:refresh_shards, state) do
    {:noreply, refresh(%{state | refresh_ref: nil})}
  end

  def handle_info({:restart_shard, shard_id}, state) do
    {:noreply, start_shards(state, [shard_id])}
  end

  def handle_info({ref, result}, %{listing: ref} = state) when is_reference(ref) do
    Process.demonitor(ref, [:flush])
    {:noreply, listed(state, result)}
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, %{listing: ref} = state) do
    {:noreply, listed(state, {:error, {:list_shards_crashed, reason}})}
  end

  def handle_info({:DOWN, monitor, :process, pid, reason}, state) do
    case for({id, %{monitor: ^monitor}} <- state.handlers, do: id) do
      [] -> dispatcher_down(state, pid, reason)
      ids -> {:noreply, Enum.reduce(ids, state, &remove_handler(&2, &1))}
    end
  end

  def handle_info(_other, state), do: {:noreply, state}

  defp dispatcher_down(state, pid, reason) do
    {since, dispatcher_since} = Map.pop(state.dispatcher_since, pid)
    state = %{state | dispatcher_since: dispatcher_since}

    cond do
      Map.has_key?(state.stopping, pid) ->
        {shard_id, stopping} = Map.pop(state.stopping, pid)
        state = handed_over(%{state | stopping: stopping}, shard_id)
        {:noreply, if(state.polling, do: start_shards(state, [shard_id]), else: state)}

      shard_id = find_dispatcher(state, pid) ->
        state = %{state | dispatchers: Map.delete(state.dispatchers, shard_id)}

        if reason in [:normal, :shutdown] do
          {:noreply, state}
        else
          # 1 s, 2 s, 4 s ... up to a minute, so a shard that keeps failing
          # neither spins nor is given up. A dispatcher that lived
          # restart_reset_after was healthy: its death counts as a first one.
          restarts =
            if since && System.monotonic_time(:millisecond) - since >= state.restart_reset_after,
              do: 0,
              else: Map.get(state.restarts, shard_id, 0)

          delay = min(1_000 * Integer.pow(2, min(restarts, 6)), 60_000)

          Logger.error(
            "Convoy #{inspect(state.stream_id)}: dispatcher of #{shard_id} exited: " <>
              "#{inspect(reason)}; restarting it from its checkpoint in #{delay} ms"
          )

          Process.send_after(self(), {:restart_shard, shard_id}, delay)
          {:noreply, %{state | restarts: Map.put(state.restarts, shard_id, restarts + 1)}}
        end

      true ->
        {:noreply, state}
    end
  end

  @impl true
  # Killed along with the consumer's supervisor: the dispatchers go with
  # their own supervisor; their batches are read again from the checkpoints.
  def terminate(:killed, _state), do: :ok

  def terminate(_reason, state) do
    Enum.each(Map.values(state.dispatchers), &ShardDispatcher.stop/1)
  end

  # ---------------------------------------------------------------------------
  # Handlers and polling

  defp add_handler(state, id, handler, config, opts) do
    existing = Map.get(state.handlers, id)

    if existing && !opts[:replace] do
      {:error, :already_exists}
    else
      # A replacement takes the old handler's place in the attach order.
      if existing && existing.monitor, do: Process.demonitor(existing.monitor, [:flush])

      # `ref` names this attachment: dispatchers track handlers by it, so a
      # handler detached and attached again under the same id is a new one.
      entry = %{
        id: id,
        ref: make_ref(),
        handler: handler,
        config: config,
        opts: opts,
        order: if(existing, do: existing.order, else: state.next_order),
        monitor: if(is_pid(handler), do: Process.monitor(handler))
      }

      state = %{
        state
        | handlers: Map.put(state.handlers, id, entry),
          next_order: state.next_order + 1
      }

      handler_event(state, [:convoy, :queue, :attach], id)
      {:ok, state |> store_handlers() |> broadcast_handlers()}
    end
  end

  # Convoy 0.1's events, with its measurements and metadata (and the
  # stream_id added). Callers write the event out, so that every event name
  # can be found in the source (test/convoy/telemetry_events_test.exs).
  defp handler_event(state, event, id) do
    Convoy.Telemetry.execute(
      event,
      %{handler_count: map_size(state.handlers)},
      %{stream: state.stream, stream_id: state.stream_id, handler_id: id}
    )
  end

  defp remove_handler(state, id) do
    {entry, handlers} = Map.pop(state.handlers, id)
    if entry.monitor, do: Process.demonitor(entry.monitor, [:flush])
    state = %{state | handlers: handlers}
    handler_event(state, [:convoy, :queue, :detach], id)

    state
    |> store_handlers()
    |> broadcast_handlers()
    |> update_polling()
  end

  defp remonitor(%{handler: pid} = entry) when is_pid(pid),
    do: %{entry | monitor: Process.monitor(pid)}

  defp remonitor(entry), do: entry

  # Monitors the queue's handler store; nil when there is none.
  defp watch_handler_store(stream_id) do
    case Convoy.Queue.Topology.whereis(Convoy.Consumer.Handlers, stream_id) do
      nil -> nil
      pid -> Process.monitor(pid)
    end
  end

  defp store_handlers(state) do
    :ok = Convoy.Consumer.Handlers.store(state.stream_id, state.handlers, state.next_order)
    state
  end

  defp handler_list(state), do: state.handlers |> Map.values() |> Enum.sort_by(& &1.order)

  defp broadcast_handlers(state) do
    handlers = handler_list(state)
    Enum.each(Map.values(state.dispatchers), &ShardDispatcher.set_handlers(&1, handlers))
    state
  end

  defp update_polling(state) do
    wanted = map_size(state.handlers) > 0 and (state.pushed or not is_nil(state.poll_interval))

    cond do
      # Pollers start from the checkpoints: what get/2 held is read again.
      wanted and not state.polling ->
        consuming(refresh(%{state | polling: true, pull: %{}}), true)

      not wanted and state.polling ->
        consuming(stop_polling(state), false)

      true ->
        state
    end
  end

  # With leases, the coordinator takes leases only while shards are read,
  # and gives them up when reading stops (no handler left).
  defp consuming(%{leased: true} = state, consuming?) do
    Convoy.Leases.set_consuming(state.stream_id, consuming?)
    state
  end

  defp consuming(state, _consuming?), do: state

  defp stop_polling(state) do
    if state.refresh_ref, do: Process.cancel_timer(state.refresh_ref)

    stopping =
      Enum.reduce(state.dispatchers, state.stopping, fn {shard_id, pid}, acc ->
        ShardDispatcher.stop_async(pid)
        Map.put(acc, pid, shard_id)
      end)

    %{state | polling: false, dispatchers: %{}, stopping: stopping, refresh_ref: nil}
  end

  # Shards are listed in a task: the call goes over the network, and a slow
  # endpoint must not hold up attach or detach. One listing at a time.
  defp refresh(%{polling: false, pinned: true} = state), do: state
  defp refresh(%{listing: ref} = state) when ref != nil, do: %{state | relist: true}

  defp refresh(state) do
    {module, source} = state.source
    task = Task.async(fn -> module.list_shards(source) end)
    %{state | listing: task.ref, listing_sent: System.monotonic_time(), relist: false}
  end

  defp listed(state, result) do
    state = %{state | listing: nil}

    {state, next} =
      case result do
        {:ok, shards} ->
          state = pin_shards(%{state | shards: with_learned(state, shards)})
          {start_shards(state, readable_shards(state)), state.shard_refresh_interval}

        {:error, reason} when not state.polling ->
          # Resolving :latest before any handler: a queue that only produces
          # (perhaps without the right to list shards) is not flooded with
          # warnings. Logged once, then tried again less and less often.
          if state.pin_failures == 0 do
            Logger.warning(
              "Convoy #{inspect(state.stream_id)}: listing shards to resolve :latest " <>
                "failed: #{inspect(reason)}; trying again"
            )
          end

          delay = min(1_000 * Integer.pow(2, min(state.pin_failures, 6)), 60_000)
          {%{state | pin_failures: state.pin_failures + 1}, delay}

        {:error, reason} ->
          Logger.warning(
            "Convoy #{inspect(state.stream_id)}: listing shards failed: #{inspect(reason)}"
          )

          # Try again soon: until it works, no shard is read.
          {state, min(1_000, state.shard_refresh_interval)}
      end

    cond do
      not state.polling and not state.pinned ->
        %{state | refresh_ref: Process.send_after(self(), :pin, next)}

      not state.polling ->
        state

      state.relist ->
        refresh(state)

      true ->
        if state.refresh_ref, do: Process.cancel_timer(state.refresh_ref)
        %{state | refresh_ref: Process.send_after(self(), :refresh_shards, next)}
    end
  end

  defp list_shards(%{source: {module, source}} = state) do
    case module.list_shards(source) do
      {:ok, shards} -> {:ok, %{state | shards: Map.new(shards, &{&1.shard_id, &1})}}
      {:error, _} = error -> error
    end
  end

  # The shard map of a listing, plus children learned from a shard's end
  # after the listing was sent (it may not show them yet). A learned shard
  # that a later listing does not show is dropped.
  defp with_learned(state, shards) do
    listed = Map.new(shards, &{&1.shard_id, &1})

    learned =
      for {id, %{learned: at} = shard} <- state.shards,
          state.listing_sent != nil and at > state.listing_sent,
          into: %{},
          do: {id, shard}

    Map.merge(learned, listed)
  end

  # Children named at a parent's end join the shard map (with the time they
  # were `learned`) when they tell the whole story: each names the parent,
  # every parent it names is a shard already known, and a child of one
  # parent lies within that parent's hash key range (a child of a merge
  # covers both parents' ranges: one naming a single parent is missing the
  # other). Otherwise :error, and the shards are listed.
  defp learn_children(_state, _parent, []), do: :error

  defp learn_children(state, parent, children) do
    if Enum.all?(children, &complete_child?(state, parent, &1)) do
      learned_at = System.monotonic_time()

      shards =
        Enum.reduce(children, state.shards, fn child, shards ->
          Map.put_new(shards, child.shard_id, Map.put(child, :learned, learned_at))
        end)

      {:ok, %{state | shards: shards}}
    else
      :error
    end
  end

  defp complete_child?(state, parent, child) do
    parents =
      [child.parent_shard_id, child.adjacent_parent_shard_id]
      |> Enum.reject(&is_nil/1)
      |> Enum.uniq()

    parent in parents and Enum.all?(parents, &Map.has_key?(state.shards, &1)) and
      (length(parents) == 2 or within?(child, Map.fetch!(state.shards, parent)))
  end

  defp within?(%{starting_hash_key: s, ending_hash_key: e}, %{
         starting_hash_key: ps,
         ending_hash_key: pe
       })
       when is_binary(s) and is_binary(e) and is_binary(ps) and is_binary(pe) do
    String.to_integer(s) >= String.to_integer(ps) and
      String.to_integer(e) <= String.to_integer(pe)
  end

  defp within?(_child, _parent), do: false

  # Shards that may be read now: not finished, and every parent finished (a
  # parent no longer listed has aged out of the stream and counts as finished).
  defp readable_shards(state) do
    state.shards
    |> Map.values()
    |> Enum.filter(fn shard ->
      held?(state, shard.shard_id) and not ended?(state, shard.shard_id) and
        Enum.all?([shard.parent_shard_id, shard.adjacent_parent_shard_id], fn parent ->
          is_nil(parent) or not Map.has_key?(state.shards, parent) or ended?(state, parent)
        end)
    end)
    |> Enum.map(& &1.shard_id)
    |> Enum.sort()
  end

  defp handed_over(state, shard_id) do
    case Map.pop(state.handing_over, shard_id) do
      {nil, _} ->
        state

      {coordinator, handing_over} ->
        send(coordinator, {:shard_stopped, shard_id})
        %{state | handing_over: handing_over}
    end
  end

  # With leases a shard's end counts once the lease table has it: a SHARD_END
  # abandoned with its lease leaves the shard to its next holder (this node,
  # too) to read from its checkpoint and end again; its children wait.
  defp end_stored?(%{leased: false}, _shard_id), do: true
  defp end_stored?(state, shard_id), do: fetch_checkpoint(state, shard_id) == {:ok, :shard_end}

  defp held?(%{leased: false}, _shard_id), do: true
  defp held?(state, shard_id), do: Convoy.Leases.held?(state.stream_id, shard_id)

  # A stored :shard_end counts only for a shard with children listed: one
  # that resharding closed. Checkpoints outlive queues, and a stream deleted
  # and made again reuses shard ids, so an open shard may inherit a stale one.
  defp ended?(state, shard_id) do
    MapSet.member?(state.ended, shard_id) or
      case fetch_checkpoint(state, shard_id) do
        {:ok, :shard_end} -> has_children?(state, shard_id)
        :error -> skipped?(state, shard_id)
        _ -> false
      end
  end

  # A closed shard that `:latest` does not read (see first_position/2).
  defp skipped?(state, shard_id) do
    state.iterator_type == :latest and closed?(state, shard_id) and
      not continues_parent?(state, shard_id)
  end

  defp has_children?(state, shard_id) do
    Enum.any?(state.shards, fn {_, shard} ->
      shard_id in [shard.parent_shard_id, shard.adjacent_parent_shard_id]
    end)
  end

  defp start_shards(%{polling: false} = state, _), do: state

  defp start_shards(state, shard_ids) do
    Enum.reduce(shard_ids, state, fn shard_id, state ->
      busy = Map.has_key?(state.dispatchers, shard_id) or shard_id in Map.values(state.stopping)

      position =
        if busy or not held?(state, shard_id) or ended?(state, shard_id),
          do: :skip,
          else: position(state, shard_id)

      if position == :skip do
        state
      else
        {:ok, pid} =
          DynamicSupervisor.start_child(
            dispatchers(state),
            {ShardDispatcher,
             %{
               consumer: self(),
               stream_id: state.stream_id,
               stream: state.stream,
               shard_id: shard_id,
               source: state.source,
               position: position,
               handlers: handler_list(state),
               checkpoint: state.checkpoint,
               done_through: done_through(state, shard_id),
               reader_options: state.reader_options,
               leased: state.leased
             }}
          )

        Process.monitor(pid)

        %{
          state
          | dispatchers: Map.put(state.dispatchers, shard_id, pid),
            dispatcher_since:
              Map.put(state.dispatcher_since, pid, System.monotonic_time(:millisecond))
        }
      end
    end)
  end

  defp dispatchers(state), do: Convoy.Consumer.Supervisor.dispatchers(state.stream_id)

  # ---------------------------------------------------------------------------
  # Pull reads (get/2)
  #
  # Each shard being pulled has an entry in `state.pull`: the cursor to read
  # on from (an iterator kept across calls, so empty answers still make
  # progress), the position after the last record received (to start again
  # when the cursor fails, an expired iterator say), user records received
  # but not yet returned (an aggregated record may hold more than `limit`),
  # and the time of its last read (Kinesis allows 5 reads per second per
  # shard). A call reads in rounds, each shard in turn from a rotating
  # first one, each taking its share of what is left of `limit`, until
  # `limit` records are in hand, every shard is caught up or ended,
  # @pull_rounds rounds are done, or it has read for @pull_budget_ms (a
  # read started then still finishes). A shard read to its end is checkpointed
  # `:shard_end` and its children become readable in the same call. The
  # checkpoint of a shard is the last record returned, with its
  # sub-sequence number when it came out of an aggregated record.

  @pull_rounds 10
  @read_spacing_ms 200
  # How long a call goes on starting reads; its caller waits for it to end.
  @pull_budget_ms 20_000

  defp pull(state, limit) do
    deadline = System.monotonic_time(:millisecond) + @pull_budget_ms
    pull_rounds(state, limit, [], {0, deadline}, MapSet.new())
  end

  defp pull_rounds(state, remaining, acc, {round, deadline}, idle) do
    shards = Enum.reject(readable_shards(state), &MapSet.member?(idle, &1))

    if remaining == 0 or shards == [] or round == @pull_rounds or past?(deadline) do
      {Enum.reverse(acc) |> List.flatten(), %{state | pull_turn: state.pull_turn + 1}}
    else
      {first, second} = Enum.split(shards, rem(state.pull_turn, length(shards)))
      share = max(1, div(remaining + length(shards) - 1, length(shards)))

      result =
        Enum.reduce_while(second ++ first, {state, remaining, acc, idle}, fn
          shard_id, {state, remaining, acc, idle} = done ->
            if remaining == 0 or past?(deadline) do
              {:halt, done}
            else
              case pull_shard(state, shard_id, min(share, remaining)) do
                {:ok, records, caught_up?, state} ->
                  idle = if caught_up?, do: MapSet.put(idle, shard_id), else: idle
                  {:cont, {state, remaining - length(records), [records | acc], idle}}

                {:error, reason, state} ->
                  {:halt, {:error, reason, state, acc}}
              end
            end
        end)

      case result do
        {:error, reason, state, []} ->
          {{:error, reason}, state}

        {:error, reason, state, acc} ->
          # What was read is returned (and checkpointed); the error is logged.
          Logger.warning("Convoy #{inspect(state.stream_id)}: get/2: #{inspect(reason)}")
          {Enum.reverse(acc) |> List.flatten(), %{state | pull_turn: state.pull_turn + 1}}

        {state, remaining, acc, idle} ->
          pull_rounds(state, remaining, acc, {round + 1, deadline}, idle)
      end
    end
  end

  defp past?(deadline), do: System.monotonic_time(:millisecond) >= deadline

  # Up to `n` user records of a shard: {:ok, records, caught_up?, state}.
  defp pull_shard(state, shard_id, n) do
    entry =
      Map.get_lazy(state.pull, shard_id, fn ->
        position = position(state, shard_id)

        %{
          cursor: position,
          resume: position,
          buffer: [],
          ended: false,
          last_read: nil,
          done: done_through(state, shard_id)
        }
      end)

    if entry.buffer != [] or entry.ended do
      {records, rest} = Enum.split(entry.buffer, n)
      {:ok, records, false, hand_out(state, shard_id, %{entry | buffer: rest}, records)}
    else
      pause_reads(entry)

      case read_shard(state, shard_id, entry, n) do
        {:ok, records, next, millis_behind, entry} ->
          {records, entry} = drop_done(records, entry)
          {taken, rest} = Enum.split(records, n)

          entry = %{
            entry
            | cursor: next,
              ended: is_nil(next),
              buffer: rest,
              resume:
                if(last = List.last(records),
                  do: {:after_sequence_number, last.sequence_number},
                  else: entry.resume
                )
          }

          # Caught up: an answer that was all there is (and no end to note).
          caught_up? = next != nil and rest == [] and length(records) < n and millis_behind <= 0
          {:ok, taken, caught_up?, hand_out(state, shard_id, entry, taken)}

        {:error, reason, entry} ->
          {:error, reason, %{state | pull: Map.put(state.pull, shard_id, entry)}}
      end
    end
  end

  # As the dispatcher does: the user records of the checkpoint's
  # aggregated record up to its sub-sequence number were returned already.
  defp drop_done(records, %{done: {_, _} = done} = entry) when records != [] do
    {Convoy.Checkpoint.drop_processed(records, done), %{entry | done: nil}}
  end

  defp drop_done(records, entry), do: {records, entry}

  defp pause_reads(%{last_read: nil}), do: :ok

  defp pause_reads(%{last_read: at}) do
    wait = at + @read_spacing_ms - System.monotonic_time(:millisecond)
    if wait > 0, do: Process.sleep(wait)
  end

  # One read; a cursor that fails (an expired iterator) is replaced by the
  # position after the last record received, once.
  defp read_shard(%{source: {module, source}}, shard_id, entry, n) do
    entry = %{entry | last_read: System.monotonic_time(:millisecond)}

    case module.read(source, shard_id, entry.cursor, n) do
      {:ok, records, next, millis_behind} ->
        {:ok, records, next, millis_behind, entry}

      {:error, reason} when entry.cursor != entry.resume ->
        Logger.info(
          "Convoy: get/2 reads #{shard_id} again from its last position after: #{inspect(reason)}"
        )

        Process.sleep(@read_spacing_ms)
        read_shard(%{source: {module, source}}, shard_id, %{entry | cursor: entry.resume}, n)

      {:error, reason} ->
        {:error, reason, entry}
    end
  end

  # Records returned: checkpoints the last Kinesis record fully returned, and
  # ends a shard whose every record was returned.
  defp hand_out(state, shard_id, entry, records) do
    case entry do
      %{ended: true, buffer: []} ->
        if records != [],
          do: store_checkpoint(state, shard_id, List.last(records).sequence_number)

        :ok = store_checkpoint(state, shard_id, :shard_end)

        %{
          state
          | pull: Map.delete(state.pull, shard_id),
            ended: MapSet.put(state.ended, shard_id)
        }

      _ ->
        # The last record returned, with its sub-sequence number when it
        # came out of an aggregated record (perhaps not all of it returned).
        case List.last(records) do
          nil ->
            :ok

          %{sub_sequence_number: nil} = last ->
            store_checkpoint(state, shard_id, last.sequence_number)

          last ->
            store_checkpoint(state, shard_id, {last.sequence_number, last.sub_sequence_number})
        end

        %{state | pull: Map.put(state.pull, shard_id, entry)}
    end
  end

  # Dispatchers a crashed predecessor started still read their shards: stop
  # them, so each shard has one reader.
  defp stop_orphan_dispatchers(stream_id) do
    sup = Convoy.Consumer.Supervisor.dispatchers(stream_id)

    for {_, pid, _, _} <- DynamicSupervisor.which_children(sup), is_pid(pid) do
      DynamicSupervisor.terminate_child(sup, pid)
    end
  end

  defp find_dispatcher(state, pid) do
    Enum.find_value(state.dispatchers, fn {shard_id, p} -> if p == pid, do: shard_id end)
  end

  # Where a shard starts reading, or :skip for a shard this consumer does
  # not read at all. After its checkpoint when it has one (a `:latest`
  # resolved at first start is stored as `{:at_timestamp, ms}`); otherwise
  # see `first_position/2`.
  defp position(state, shard_id) do
    case fetch_checkpoint(state, shard_id) do
      {:ok, sequence} when is_binary(sequence) ->
        {:after_sequence_number, sequence}

      # Inside (or at the end of) an aggregated record: read it again, and
      # skip its user records up to the sub-sequence number (`done_through/2`).
      {:ok, {sequence, sub}} when is_binary(sequence) and is_integer(sub) ->
        {:at_sequence_number, sequence}

      {:ok, {:at_timestamp, ms}} when is_integer(ms) ->
        {:at_timestamp, ms}

      _ ->
        first_position(state, shard_id)
    end
  end

  # The user records a shard's first records hold that its checkpoint
  # covers: `{sequence_number, sub_sequence_number}` or nil.
  defp done_through(state, shard_id) do
    case fetch_checkpoint(state, shard_id) do
      {:ok, {sequence, sub}} when is_binary(sequence) and is_integer(sub) -> {sequence, sub}
      _ -> nil
    end
  end

  # A shard without a checkpoint, as the KCL treats initial positions: a
  # child of a shard this consumer read (it has a checkpoint) goes on from
  # its start; any other shard starts at `iterator_type`. Under `:latest` a
  # closed shard nobody read holds nothing "after now": it is skipped, and
  # an open one is pinned to the consumer's start time, stored as its first
  # checkpoint so that a restarted consumer or queue resumes there.
  defp first_position(state, shard_id) do
    continues? = continues_parent?(state, shard_id)

    case state.iterator_type do
      {:at_timestamp, %DateTime{} = at} ->
        {:at_timestamp, DateTime.to_unix(at, :millisecond)}

      _ when continues? ->
        :trim_horizon

      :latest ->
        if closed?(state, shard_id), do: :skip, else: pin_latest(state, shard_id)

      {kind, sequences} when is_map(sequences) ->
        case Map.fetch(sequences, shard_id) do
          {:ok, sequence} -> {kind, sequence}
          :error -> :trim_horizon
        end

      other ->
        other
    end
  end

  defp pin_latest(state, shard_id) do
    store_checkpoint(state, shard_id, {:at_timestamp, state.started_at})
    {:at_timestamp, state.started_at}
  end

  # Whether a parent of the shard was read by this consumer: it has a
  # checkpoint, or ended while this consumer read it.
  defp continues_parent?(state, shard_id) do
    shard = Map.get(state.shards, shard_id, %{})

    Enum.any?([shard[:parent_shard_id], shard[:adjacent_parent_shard_id]], fn parent ->
      parent != nil and
        (MapSet.member?(state.ended, parent) or fetch_checkpoint(state, parent) != :error)
    end)
  end

  defp closed?(state, shard_id) do
    case Map.get(state.shards, shard_id) do
      %{ending_sequence_number: ending} when ending != nil -> true
      _ -> has_children?(state, shard_id)
    end
  end

  # Under `:latest`, the open shards without a checkpoint are pinned as soon
  # as the shard list is known, whether or not a handler is attached yet.
  defp pin_shards(%{iterator_type: :latest} = state) do
    for shard_id <- readable_shards(state),
        fetch_checkpoint(state, shard_id) == :error,
        do: position(state, shard_id)

    %{state | pinned: true}
  end

  defp pin_shards(state), do: %{state | pinned: true}

  defp fetch_checkpoint(%{checkpoint: {module, checkpoint}, stream_id: stream_id}, shard_id),
    do: module.fetch(checkpoint, stream_id, shard_id)

  defp store_checkpoint(%{checkpoint: {module, checkpoint}, stream_id: id}, shard_id, sequence),
    do: module.store(checkpoint, id, shard_id, sequence)
end
