# One Convoy node of the multi-node lease tests, run as its own OS process
# (`elixir -pa _build/test/lib/convoy/ebin test/leases/node.exs CONFIG`) by
# Convoy.TestSupport.LeaseNode. CONFIG is a Base64 external term:
# `{queue_options, node_options}` (node options: `handler_ms`, the time the
# handler takes per record; `slow_shards`, a map of shard id to the time it
# takes per record of that shard instead). It reports on stdout, one line each:
#   READY
#   REC <os time µs> <shard_id> <sequence_number> <data>   each record handed to the handler
#   HELD <shard_id,...>                          the shards held, every 200 ms
#   CKPT <shard_id> <checkpoint>                 a held shard's checkpoint as this
#                                                node stored (or found) it, within 10 ms
#   STOPPED                                      after "stop" on stdin
# and stops at once (a plain halt) when stdin closes.

[encoded] = System.argv()
{options, node_options} = encoded |> Base.decode64!() |> :erlang.binary_to_term()
# A handler that takes a moment per record, so that stops and lease moves
# happen while batches are in hand.
handler_ms = Keyword.get(node_options, :handler_ms, 0)
slow_shards = Keyword.get(node_options, :slow_shards, %{})
Logger.configure(level: :warning)
{:ok, _} = Application.ensure_all_started(:convoy)

stream_id = options[:stream_id] || options[:stream]

printer = fn record, _config ->
  ms = Map.get(slow_shards, record.shard_id, handler_ms)
  if ms > 0, do: Process.sleep(ms)

  IO.puts(
    "REC #{System.os_time(:microsecond)} #{record.shard_id} #{record.sequence_number} #{record.data}"
  )
end

Process.flag(:trap_exit, true)
{:ok, queue} = Convoy.Queue.start_link(options ++ [handlers: [{:printer, printer, nil}]])
IO.puts("READY")

spawn_link(fn ->
  report = fn report ->
    IO.puts("HELD " <> Enum.join(Convoy.Leases.held(stream_id), ","))
    Process.sleep(200)
    report.(report)
  end

  report.(report)
end)

# The checkpoints of held shards, as this node last stored them (or found
# them when it took the lease): a lower bound of where its successor starts.
spawn_link(fn ->
  watch = fn watch, known ->
    known =
      Enum.reduce(Convoy.Leases.held(stream_id), known, fn shard, known ->
        checkpoint = Convoy.Leases.checkpoint(stream_id, shard)

        if is_binary(checkpoint) and Map.get(known, shard) != checkpoint do
          IO.puts("CKPT #{shard} #{checkpoint}")
        end

        Map.put(known, shard, checkpoint)
      end)

    Process.sleep(10)
    watch.(watch, known)
  end

  watch.(watch, %{})
end)

read = fn read ->
  case IO.gets("") do
    "stop\n" ->
      Supervisor.stop(queue, :normal, 60_000)
      IO.puts("STOPPED")
      System.halt(0)

    "info\n" ->
      IO.puts("INFO " <> inspect(Convoy.Leases.Coordinator.info(stream_id)))
      read.(read)

    _eof ->
      System.halt(0)
  end
end

read.(read)
