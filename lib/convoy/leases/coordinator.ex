defmodule Convoy.Leases.Coordinator do
  @moduledoc """
  The lease coordinator of one queue with `:leases`: a process in the
  queue's consumer tree, started before `Convoy.Consumer` and stopped after
  it (so the shards' last checkpoints are stored before their leases are
  given up).

  Its rounds, all run in tasks so the process always answers:

    * **renew**, every `failover / 3` ms: every held lease's counter + 1,
      conditional on the counter and the owner. A renewed lease may hand
      records to handlers until `failover / 2` after the renewal started
      (`Convoy.Leases.may_dispatch?/2`); a lease another worker wrote is
      lost at once; a lease that could not be renewed for `failover` is
      dropped (another worker may take it from then on).
    * **take**, every `take_interval` ms (and at once after a change): scan
      the table (consistent, paginated); every `shard_refresh_interval`, list
      the stream's shards and create the missing leases; decide with
      `Convoy.Leases.Balance` which leases to take; take them; give up leases
      of finished shards; delete finished leases whose children have
      checkpoints.

  The consumer is told `:leases_changed` when the set of held shards changed;
  it starts the shards this node holds and stops the others. DynamoDB errors
  are logged, emitted as telemetry (`[:convoy, :lease, :error]`) and retried
  on the next round; nothing is written without the counter condition.

  ## Example

      # started by the queue; to look at it:
      Convoy.Leases.Coordinator.info("orders")
      #=> %{worker_id: "...", held: [...], leases: 8, workers: 2, calls: 412}
  """
  use GenServer

  require Logger

  alias Convoy.{Leases, Native, Telemetry}
  alias Convoy.Leases.{Balance, Lease}

  @doc false
  def child_spec(options) do
    %{
      id: __MODULE__,
      start: {__MODULE__, :start_link, [options]},
      shutdown: 30_000
    }
  end

  @doc """
  Starts the coordinator; options: `:stream`, `:stream_id`, `:leases` (validated
  `:leases` queue option), `:kinesis` (`Convoy.KinesisConfig`), `:source`,
  `:iterator_type`, `:shard_refresh_interval`, `:consumer` (the name to
  notify).

  ## Example

      Convoy.Leases.Coordinator.start_link(stream_id: "orders", leases: [table: "t"], ...)
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(options) do
    GenServer.start_link(__MODULE__, options,
      name: Convoy.Queue.Topology.name(__MODULE__, Keyword.fetch!(options, :stream_id))
    )
  end

  @doc """
  What the coordinator of `stream_id` knows: its worker id, the shards it
  holds, the leases and workers of the last scan, and DynamoDB calls made.

  ## Example

      %{held: held} = Convoy.Leases.Coordinator.info("orders")
  """
  @spec info(term) :: map | {:error, :closed}
  def info(stream_id) do
    GenServer.call(Convoy.Queue.Topology.name(__MODULE__, stream_id), :info)
  catch
    :exit, _ -> {:error, :closed}
  end

  @doc """
  The `worker_id` used when none is given: host, OS process and a unique
  number, so it differs per node and per run.

  ## Example

      Convoy.Leases.Coordinator.default_worker_id()
      #=> "web-1:4242:5769"
  """
  @spec default_worker_id() :: String.t()
  def default_worker_id do
    {:ok, host} = :inet.gethostname()
    "#{host}:#{System.pid()}:#{System.unique_integer([:positive])}"
  end

  # ---------------------------------------------------------------------------

  @impl true
  def init(options) do
    Process.flag(:trap_exit, true)
    stream_id = Keyword.fetch!(options, :stream_id)
    names = %{stream: Keyword.get(options, :stream, stream_id), stream_id: stream_id}
    leases = Keyword.fetch!(options, :leases)
    failover = leases[:failover]
    worker_id = leases[:worker_id] || default_worker_id()
    Leases.clear(stream_id)

    # DynamoDB connection settings given in `leases:` win over the Kinesis ones.
    config =
      struct(
        options[:kinesis] || Convoy.KinesisConfig.resolve([]),
        Keyword.take(leases, Convoy.Queue.Options.lease_connection_keys())
      )

    with {:ok, client} <-
           Native.call(
             &Native.lease_client_new(
               Convoy.KinesisConfig.to_native(config),
               leases[:table],
               worker_id,
               &1
             )
           ),
         {:ok, prepared} <- prepare(client, names, leases[:table]) do
      Leases.put_client(stream_id, client, self())

      state = %{
        stream: names.stream,
        stream_id: stream_id,
        client: client,
        table: leases[:table],
        worker_id: worker_id,
        failover: failover,
        take_interval: leases[:take_interval] || failover,
        renew_interval: max(div(failover, 3), 1),
        sync_interval: options[:shard_refresh_interval] || 60_000,
        source: Keyword.fetch!(options, :source),
        initial_checkpoint: initial_checkpoint(options[:iterator_type]),
        consumer: options[:consumer],
        # false while the table could not be checked (DynamoDB unreachable
        # at start): each take round tries again first.
        prepared: prepared,
        # key => monotonic ms of the last renewal (or take) that succeeded
        held: %{},
        seen: %{},
        leases: %{},
        workers: 0,
        synced_at: nil,
        take_task: nil,
        take_again: false,
        renew_task: nil,
        renew_started: nil,
        take_timer: nil,
        errors: 0,
        # The lease being handed over (its shard stopping), and since when.
        shedding: nil,
        # A steal is done only when a round wanted one and the next still
        # does: a Convoy node over its target gives a lease up gracefully
        # (`Balance.to_shed/4`) in between, and stealing is abrupt.
        steal_armed: false,
        # Successful take rounds so far (see warm_up/4).
        rounds: 0,
        # Leases held while the queue reads nothing, as of the last round.
        idle: MapSet.new()
      }

      send(self(), :take)
      Process.send_after(self(), :renew, state.renew_interval)

      Logger.info(
        "Convoy #{inspect(stream_id)}: lease coordinator #{worker_id} on table #{leases[:table]}"
      )

      {:ok, state}
    else
      {:error, {:kcl3_table, table, version}} = error ->
        Logger.error(
          "Convoy #{inspect(stream_id)}: the lease table #{leases[:table]} was migrated to KCL 3.x " <>
            "(#{table} has client version #{version}); Convoy speaks the KCL 2.x lease protocol " <>
            "and will not share it. Use another table, or roll the application back to KCL 2.x."
        )

        {:stop, elem(error, 1)}

      {:error, reason} ->
        {:stop, {:lease_client, reason}}
    end
  end

  # Checks and creates the table. An unreachable DynamoDB does not stop the
  # queue: the take rounds try again. A KCL 3.x table does.
  defp prepare(client, names, table) do
    case Native.call(&Native.lease_prepare(client, &1), 60_000) do
      {:ok, _} ->
        {:ok, true}

      {:error, {:kcl3_table, _, _}} = error ->
        error

      {:error, reason} ->
        lease_error(names, :prepare, table, reason)
        {:ok, false}
    end
  end

  # The KCL sentinel a new lease starts with. Sequence numbers start the
  # shards they do not name at their start, as without leases: the closed
  # shards of a split get leases too, and are read before their children.
  defp initial_checkpoint(:trim_horizon), do: "TRIM_HORIZON"
  defp initial_checkpoint({:at_timestamp, _}), do: "AT_TIMESTAMP"

  defp initial_checkpoint({kind, _}) when kind in [:at_sequence_number, :after_sequence_number],
    do: "TRIM_HORIZON"

  defp initial_checkpoint(_latest), do: "LATEST"

  @impl true
  def handle_call(:info, _from, state) do
    reply = %{
      worker_id: state.worker_id,
      table: state.table,
      held: state.held |> Map.keys() |> Enum.sort(),
      leases: map_size(state.leases),
      workers: state.workers,
      calls: Native.lease_calls(state.client)
    }

    {:reply, reply, state}
  end

  @impl true
  def handle_info(:take, %{take_task: nil} = state) do
    {:noreply, start_take(%{state | take_timer: nil})}
  end

  def handle_info(:take, state), do: {:noreply, %{state | take_again: true, take_timer: nil}}

  def handle_info(:renew, %{renew_task: nil} = state) do
    Process.send_after(self(), :renew, state.renew_interval)
    {:noreply, start_renew(state)}
  end

  def handle_info(:renew, state) do
    # The previous renewal is still out: its result decides.
    Process.send_after(self(), :renew, state.renew_interval)
    {:noreply, state}
  end

  def handle_info({ref, result}, %{take_task: ref} = state) do
    Process.demonitor(ref, [:flush])
    {:noreply, taken_round(%{state | take_task: nil}, result)}
  end

  def handle_info({ref, result}, %{renew_task: ref} = state) do
    Process.demonitor(ref, [:flush])
    {:noreply, renewed(%{state | renew_task: nil}, result)}
  end

  def handle_info({:DOWN, ref, :process, _, reason}, %{take_task: ref} = state) do
    {:noreply, taken_round(%{state | take_task: nil}, {:error, {:crashed, reason}})}
  end

  def handle_info({:DOWN, ref, :process, _, reason}, %{renew_task: ref} = state) do
    {:noreply, renewed(%{state | renew_task: nil}, {:error, {:crashed, reason}})}
  end

  # A shard was read to its end and its SHARD_END stored: give its lease up
  # and look for its children at once.
  def handle_info({:finished, shard_id}, state) do
    # Its children may have no leases yet: list the shards in the next round.
    state = %{release(state, shard_id) | synced_at: nil}
    {:noreply, take_soon(state)}
  end

  # The consumer stopped the shard being handed over (its last checkpoint is
  # stored): give the lease up.
  def handle_info({:shard_stopped, shard_id}, %{shedding: {shard_id, _}} = state) do
    {:noreply, %{release(state, shard_id) | shedding: nil}}
  end

  def handle_info({:shard_stopped, _shard_id}, state), do: {:noreply, state}

  # A checkpoint found the lease taken by another worker.
  def handle_info({:lost, shard_id}, state) do
    {:noreply, lose(state, shard_id, :lease_lost)}
  end

  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}
  def handle_info(_other, state), do: {:noreply, state}

  # Stopped after the consumer: its dispatchers stored their checkpoints.
  # Give every lease up, so other nodes take them without waiting for expiry.
  @impl true
  def terminate(_reason, state) do
    # All at once, then up to 5 s for the answers: a slow or unreachable
    # DynamoDB must not hold the queue's shutdown (the leases then expire).
    refs =
      for key <- Map.keys(state.held) do
        Leases.drop(state.stream_id, key)
        ref = make_ref()
        :ok = Native.lease_release(state.client, key, {self(), ref})
        ref
      end

    deadline = System.monotonic_time(:millisecond) + 5_000

    Enum.each(refs, fn ref ->
      receive do
        {^ref, _} -> :ok
      after
        max(deadline - System.monotonic_time(:millisecond), 0) -> :ok
      end
    end)

    Leases.clear(state.stream_id)
    :ok
  end

  # ---------------------------------------------------------------------------
  # Renewal

  defp start_renew(%{held: held} = state) when map_size(held) == 0, do: state

  defp start_renew(state) do
    client = state.client
    task = Task.async(fn -> Native.call(&Native.lease_renew_all(client, &1)) end)
    %{state | renew_task: task.ref, renew_started: now()}
  end

  defp renewed(state, {:ok, outcomes}) do
    started = state.renew_started

    Enum.reduce(outcomes, state, fn
      {key, :ok}, state ->
        if Map.has_key?(state.held, key) do
          Leases.renew(state.stream_id, key, started + div(state.failover, 2))
          %{state | held: Map.put(state.held, key, started)}
        else
          state
        end

      {key, {:error, :lease_lost}}, state ->
        lose(state, key, :lease_lost)

      {key, {:error, reason}}, state ->
        lease_error(state, :renew, key, reason)
        expire_if_stale(state, key)
    end)
  end

  defp renewed(state, {:error, reason}) do
    lease_error(state, :renew, :all, reason)
    Enum.reduce(Map.keys(state.held), state, &expire_if_stale(&2, &1))
  end

  # Not renewed for `failover`: other workers may take it now. Stop holding it.
  defp expire_if_stale(state, key) do
    case state.held do
      %{^key => last} when is_integer(last) ->
        if now() - last >= state.failover do
          Native.lease_forget(state.client, key)
          lose(state, key, :not_renewed)
        else
          state
        end

      _ ->
        state
    end
  end

  defp lose(state, key, why) do
    if Map.has_key?(state.held, key) do
      Logger.warning(
        "Convoy #{inspect(state.stream_id)}: lease of #{key} lost (#{why}); its shard stops here"
      )

      Telemetry.execute([:convoy, :lease, :lost], %{count: 1}, %{
        stream: state.stream,
        stream_id: state.stream_id,
        shard_id: key,
        reason: why
      })

      Leases.drop(state.stream_id, key)
      state = %{state | held: Map.delete(state.held, key)}
      notify_consumer(state)
      take_soon(state)
    else
      state
    end
  end

  defp release(state, key) do
    if Map.has_key?(state.held, key) do
      Leases.drop(state.stream_id, key)
      client = state.client
      # Fire and forget: a failed release only delays the next holder.
      Task.start(fn -> Native.call(&Native.lease_release(client, key, &1)) end)
      %{state | held: Map.delete(state.held, key)}
    else
      state
    end
  end

  # ---------------------------------------------------------------------------
  # Taking

  defp take_soon(%{take_timer: nil, take_task: nil} = state) do
    %{state | take_timer: Process.send_after(self(), :take, 200)}
  end

  defp take_soon(%{take_task: ref} = state) when ref != nil, do: %{state | take_again: true}
  defp take_soon(state), do: state

  defp start_take(state) do
    sync? = state.synced_at == nil or now() - state.synced_at >= state.sync_interval
    %{client: client, source: {module, source}} = state
    initial = state.initial_checkpoint
    prepared = state.prepared

    task =
      Task.async(fn ->
        with {:ok, _} <- if(prepared, do: {:ok, :exists}, else: prepare_table(client)),
             {:ok, leases} <- list(client),
             {:ok, created} <-
               if(sync?, do: sync(client, module, source, leases, initial), else: {:ok, 0}),
             {:ok, leases} <- if(created > 0, do: list(client), else: {:ok, leases}) do
          {:ok, leases, sync?}
        end
      end)

    %{state | take_task: task.ref, take_again: false}
  end

  defp list(client), do: Native.call(&Native.lease_list(client, &1))

  defp prepare_table(client), do: Native.call(&Native.lease_prepare(client, &1), 60_000)

  # Creates the leases of shards that have none, parents before children. A
  # shard with a descendant's lease, at any depth, gets none: it was finished
  # and cleaned up (a parent's lease goes once its children have
  # checkpoints, so after two splits only the grandchildren's are left).
  defp sync(client, module, source, leases, initial) do
    with {:ok, shards} <- module.list_shards(source) do
      known = MapSet.new(leases, & &1.key)
      finished = ancestors(shards, leases)

      shards
      |> order_parents_first()
      |> Enum.reject(
        &(MapSet.member?(known, &1.shard_id) or MapSet.member?(finished, &1.shard_id))
      )
      # As the KCL does: from LATEST, a closed shard holds nothing to read
      # and gets no lease; a child continues from its start only when a
      # parent has a lease (is or was read).
      |> Enum.reject(&(initial == "LATEST" and Map.get(&1, :ending_sequence_number) != nil))
      |> Enum.reduce_while({:ok, 0, known}, fn shard, {:ok, created, leased} ->
        parent_ids =
          Enum.reject([shard.parent_shard_id, shard.adjacent_parent_shard_id], &is_nil/1)

        continues? = Enum.any?(parent_ids, &MapSet.member?(leased, &1))

        lease = %Lease{
          key: shard.shard_id,
          counter: 0,
          checkpoint: if(continues?, do: "TRIM_HORIZON", else: initial),
          parent_shard_ids: parent_ids
        }

        case Native.call(&Native.lease_create(client, lease, &1)) do
          {:ok, true} -> {:cont, {:ok, created + 1, MapSet.put(leased, shard.shard_id)}}
          {:ok, false} -> {:cont, {:ok, created, MapSet.put(leased, shard.shard_id)}}
          {:error, _} = error -> {:halt, error}
        end
      end)
      |> case do
        {:ok, created, _} -> {:ok, created}
        error -> error
      end
    end
  end

  # The shards the leased ones descend from: their leases' parents, and
  # those parents' own, as far as the listing goes.
  defp ancestors(shards, leases) do
    by_id = Map.new(shards, &{&1.shard_id, &1})

    parents_of = fn id ->
      case by_id do
        %{^id => shard} -> [shard.parent_shard_id, shard.adjacent_parent_shard_id]
        _ -> []
      end
    end

    leases
    |> Enum.flat_map(& &1.parent_shard_ids)
    |> collect_ancestors(parents_of, MapSet.new())
  end

  defp collect_ancestors([], _parents_of, found), do: found

  defp collect_ancestors([id | rest], parents_of, found) do
    if is_nil(id) or MapSet.member?(found, id),
      do: collect_ancestors(rest, parents_of, found),
      else: collect_ancestors(parents_of.(id) ++ rest, parents_of, MapSet.put(found, id))
  end

  defp order_parents_first(shards) do
    ids = MapSet.new(shards, & &1.shard_id)

    depth = fn shard, depth ->
      parents =
        [shard.parent_shard_id, shard.adjacent_parent_shard_id]
        |> Enum.filter(&MapSet.member?(ids, &1))

      if parents == [] do
        0
      else
        by_id = Map.new(shards, &{&1.shard_id, &1})
        1 + Enum.max(Enum.map(parents, &depth.(Map.fetch!(by_id, &1), depth)))
      end
    end

    Enum.sort_by(shards, &{depth.(&1, depth), &1.shard_id})
  end

  defp taken_round(state, {:ok, leases, synced?}) do
    now = now()
    state = %{state | prepared: true}
    state = if synced?, do: %{state | synced_at: now}, else: state
    state = %{state | errors: 0}
    by_key = Map.new(leases, &{&1.key, &1})

    # Checkpoints of leases held elsewhere (the consumer reads parents').
    for lease <- leases, not Map.has_key?(state.held, lease.key) do
      Leases.put_checkpoint(
        state.stream_id,
        lease.key,
        lease.checkpoint,
        lease.checkpoint_sub_sequence_number
      )
    end

    # A parent without a lease, named by a child that has made progress,
    # was finished and cleaned up: the consumer, which reads a child only
    # after its parents, must see it as finished.
    for lease <- leases,
        lease.checkpoint not in [nil, "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"],
        parent <- lease.parent_shard_ids,
        not Map.has_key?(by_key, parent) do
      Leases.put_checkpoint(state.stream_id, parent, "SHARD_END")
    end

    # A held lease whose item now names another owner was taken from us.
    state =
      Enum.reduce(Map.keys(state.held), state, fn key, state ->
        case by_key do
          %{^key => %Lease{owner: owner}} when owner == state.worker_id -> state
          _ -> lose(state, key, :taken_by_another_worker)
        end
      end)

    {seen, available} = Balance.observe(state.seen, leases, now, state.failover)

    # Leases this worker id owns but this coordinator does not hold are left
    # from a previous run of the same worker: free to take at once.
    available =
      Enum.reduce(leases, available, fn lease, acc ->
        if lease.owner == state.worker_id and not Map.has_key?(state.held, lease.key),
          do: MapSet.put(acc, lease.key),
          else: acc
      end)

    workable = Enum.filter(leases, &workable?(&1, by_key))
    consuming? = Leases.consuming?(state.stream_id)

    to_take = if consuming?, do: Balance.to_take(workable, available, state.worker_id), else: []

    counts = Balance.counts(workable, available, state.worker_id)
    steal? = Enum.any?(to_take, &(not MapSet.member?(available, &1.key)))

    {to_take, armed} =
      cond do
        not steal? -> {warm_up(state, to_take, workable, available), false}
        state.steal_armed -> {to_take, false}
        true -> {[], true}
      end

    state = %{
      state
      | seen: seen,
        leases: by_key,
        workers: map_size(counts),
        steal_armed: armed,
        rounds: state.rounds + 1
    }

    state = Enum.reduce(to_take, state, &take(&2, &1))

    state =
      if consuming?,
        do: shed(%{state | idle: MapSet.new()}, workable, available),
        else: release_idle(state)

    state = give_up_finished(state)
    clean_up(state, leases)
    schedule_take(state)
  end

  # Migrated to KCL 3.x while this node ran: stop, with the reason.
  defp taken_round(_state, {:error, {:kcl3_table, _, _} = reason}) do
    exit({:shutdown, reason})
  end

  defp taken_round(state, {:error, reason}) do
    lease_error(state, :take, :all, reason)
    errors = state.errors + 1
    state = %{state | errors: errors}

    if state.take_again,
      do: start_take(state),
      else: schedule(state, min(state.take_interval, 500 * Integer.pow(2, min(errors, 5))))
  end

  defp schedule_take(state) do
    if state.take_again, do: start_take(state), else: schedule(state, state.take_interval)
  end

  defp schedule(state, delay) do
    if state.take_timer, do: Process.cancel_timer(state.take_timer)
    %{state | take_timer: Process.send_after(self(), :take, delay)}
  end

  # In its first two rounds a node takes at most half of the free leases, so
  # that nodes starting together (which cannot see each other before they
  # own a lease) share them instead of one taking all and the others
  # stealing, which hands records twice. A node alone holds everything
  # after its third round.
  defp warm_up(%{rounds: rounds}, to_take, workable, available) when rounds < 2 do
    free = Enum.count(workable, &MapSet.member?(available, &1.key))
    Enum.take(to_take, div(free + 1, 2))
  end

  defp warm_up(_state, to_take, _workable, _available), do: to_take

  # A lease worth taking: not finished, and every parent finished (a parent
  # with no lease was finished and cleaned up).
  defp workable?(%Lease{} = lease, by_key) do
    not Lease.finished?(lease) and
      Enum.all?(lease.parent_shard_ids, fn parent ->
        case by_key do
          %{^parent => parent_lease} -> Lease.finished?(parent_lease)
          _ -> true
        end
      end)
  end

  # A take is one conditional write; done here, in the coordinator, so the
  # result is known before the next round decides anything (a round takes
  # at most a few leases).
  defp take(state, %Lease{} = lease) do
    started = now()

    case Native.call(&Native.lease_take(state.client, lease.key, lease.counter, lease.owner, &1)) do
      {:ok, _counter} ->
        Logger.info(
          "Convoy #{inspect(state.stream_id)}: #{state.worker_id} took the lease of #{lease.key}" <>
            if(lease.owner, do: " from #{lease.owner}", else: "")
        )

        Telemetry.execute([:convoy, :lease, :taken], %{count: 1}, %{
          stream: state.stream,
          stream_id: state.stream_id,
          shard_id: lease.key,
          previous_owner: lease.owner
        })

        Leases.put_checkpoint(
          state.stream_id,
          lease.key,
          lease.checkpoint,
          lease.checkpoint_sub_sequence_number
        )

        Leases.hold(state.stream_id, lease.key, started + div(state.failover, 2))
        state = %{state | held: Map.put(state.held, lease.key, started)}
        notify_consumer(state)
        state

      {:error, :lease_lost} ->
        # Another worker wrote it since the scan; the next round sees why.
        state

      {:error, reason} ->
        lease_error(state, :take, lease.key, reason)
        state
    end
  end

  # Hands one lease over when this node holds more than its share and
  # another node less: the consumer stops the shard (finishing its batch and
  # storing its checkpoint), then the lease is released.
  defp shed(%{shedding: {key, since}} = state, _workable, _available) do
    if now() - since > state.failover do
      # The consumer did not answer: release anyway (its checkpoints are
      # conditional, so nothing is overwritten).
      %{release(state, key) | shedding: nil}
    else
      state
    end
  end

  defp shed(state, workable, available) do
    held = Enum.filter(workable, &Map.has_key?(state.held, &1.key))
    others = Enum.reject(workable, &Map.has_key?(state.held, &1.key))
    # Only leases this coordinator holds count as its own.
    mine = Enum.map(held, &%{&1 | owner: state.worker_id})

    case Balance.to_shed(mine ++ others, available, state.worker_id) do
      nil ->
        state

      %Lease{key: key} ->
        Logger.info(
          "Convoy #{inspect(state.stream_id)}: #{state.worker_id} hands the lease of #{key} over"
        )

        Leases.releasing(state.stream_id, key)

        case state.consumer && GenServer.whereis(state.consumer) do
          pid when is_pid(pid) -> send(pid, {:stop_shard, key, self()})
          _ -> send(self(), {:shard_stopped, key})
        end

        %{state | shedding: {key, now()}}
    end
  end

  # The queue stopped reading (no handler): its dispatchers were told to
  # stop, finishing their batches. Leases seen idle in two rounds in a row
  # are given up, so other nodes read their shards.
  defp release_idle(state) do
    held = MapSet.new(Map.keys(state.held))
    state = Enum.reduce(MapSet.intersection(held, state.idle), state, &release(&2, &1))
    %{state | idle: MapSet.new(Map.keys(state.held))}
  end

  defp give_up_finished(state) do
    Enum.reduce(Map.keys(state.held), state, fn key, state ->
      case state.leases do
        %{^key => lease} -> if Lease.finished?(lease), do: release(state, key), else: state
        _ -> state
      end
    end)
  end

  # Finished leases are deleted once each child has a lease with a real
  # checkpoint: the children started, so nothing needs the parent any more.
  defp clean_up(state, leases) do
    children = Enum.group_by(leases, & &1.parent_shard_ids)
    client = state.client

    finished =
      for lease <- leases, Lease.finished?(lease), lease.owner == nil do
        kids = for {parents, ls} <- children, lease.key in parents, l <- ls, do: l

        {lease.key, kids}
      end

    done =
      for {key, kids} <- finished,
          kids != [],
          Enum.all?(
            kids,
            &(&1.checkpoint not in [nil, "TRIM_HORIZON", "LATEST", "AT_TIMESTAMP"])
          ),
          do: key

    if done != [] do
      Task.start(fn ->
        Enum.each(done, &Native.call(fn reply -> Native.lease_delete(client, &1, reply) end))
      end)
    end

    :ok
  end

  defp notify_consumer(%{consumer: nil}), do: :ok

  defp notify_consumer(%{consumer: consumer}) do
    case GenServer.whereis(consumer) do
      pid when is_pid(pid) -> send(pid, :leases_changed)
      _ -> :ok
    end

    :ok
  end

  # `names`: the state, or anything else with its `stream` and `stream_id`.
  defp lease_error(%{stream: stream, stream_id: stream_id}, operation, key, reason) do
    Logger.warning(
      "Convoy #{inspect(stream_id)}: lease #{operation} (#{inspect(key)}) failed: #{inspect(reason)}"
    )

    Telemetry.execute([:convoy, :lease, :error], %{count: 1}, %{
      stream: stream,
      stream_id: stream_id,
      shard_id: key,
      operation: operation,
      reason: reason
    })
  end

  defp now, do: System.monotonic_time(:millisecond)
end
