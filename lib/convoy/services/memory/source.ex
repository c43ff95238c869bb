defmodule Convoy.Services.Memory.Source do
  @moduledoc false
  # Reading the in-memory stream for Convoy.Consumer: a reader process per
  # shard that follows the same protocol as the native Kinesis poller.
  @behaviour Convoy.Consumer.Source

  @impl true
  def list_shards(server), do: GenServer.call(server, :list_shards)

  @impl true
  def start_reader(server, shard_id, position, dispatcher, options) do
    spawn_link(fn -> read_loop(server, shard_id, position, dispatcher, options) end)
  end

  @impl true
  def ack(reader) do
    send(reader, :ack)
    :ok
  end

  @impl true
  def stop_reader(reader) do
    Process.unlink(reader)
    Process.exit(reader, :shutdown)
    :ok
  end

  # The cursor is a position: the one after the last record read.
  @impl true
  def read(server, shard_id, position, limit) do
    # One record more than asked tells whether the shard holds more.
    case GenServer.call(server, {:read, shard_id, position, limit + 1}) do
      {:ok, records, ended} ->
        {records, more} = Enum.split(records, limit)

        next =
          case List.last(records) do
            _ when ended and more == [] -> nil
            nil -> position
            last -> {:after_sequence_number, last.sequence_number}
          end

        {:ok, records, next, if(more == [], do: 0, else: 1)}

      {:error, _} = error ->
        error
    end
  end

  defp read_loop(server, shard_id, position, dispatcher, options) do
    started = System.monotonic_time()
    result = GenServer.call(server, {:read, shard_id, position, options.poll_limit})
    if Convoy.Telemetry.enabled?(), do: report(dispatcher, shard_id, started, result)

    case result do
      {:ok, [], true} ->
        send(dispatcher, {:convoy_shard_end, shard_id})

      {:ok, [], false} ->
        Process.sleep(options.poll_interval)
        read_loop(server, shard_id, position, dispatcher, options)

      {:ok, records, _ended} ->
        send(dispatcher, {:convoy_records, shard_id, records, 0})
        last = List.last(records).sequence_number

        receive do
          :ack -> read_loop(server, shard_id, {:after_sequence_number, last}, dispatcher, options)
        end

      {:error, reason} ->
        send(dispatcher, {:convoy_poller_stopped, shard_id, reason})
    end
  end

  # The same report the native poller sends for each GetRecords call.
  defp report(dispatcher, shard_id, started, result) do
    duration = System.convert_time_unit(System.monotonic_time() - started, :native, :nanosecond)

    {count, error} =
      case result do
        {:ok, records, _ended} -> {length(records), nil}
        {:error, reason} -> {0, reason}
      end

    send(
      dispatcher,
      {:convoy_get_records, shard_id,
       %{
         duration: duration,
         count: count,
         millis_behind_latest: if(error, do: nil, else: 0),
         next_iterator: nil,
         error: error
       }}
    )
  end
end
