defmodule Convoy.Services.Kinesis.Source do
  @moduledoc false
  # Reading Kinesis for Convoy.Consumer: ListShards, and one native reader
  # per shard, a tokio task that hands batches over and waits for each ack: a
  # GetRecords poller, or a SubscribeToShard subscriber when the queue reads
  # by enhanced fan-out (`fan_out` holds the registered stream consumer).
  @behaviour Convoy.Consumer.Source

  alias Convoy.Native

  @impl true
  def list_shards(%{client: client, stream: stream}) do
    Native.call(&Native.list_shards_nif(client, stream, &1))
  end

  @impl true
  def start_reader(%{fan_out: fan_out} = source, shard_id, position, dispatcher, options)
      when fan_out != nil do
    options = %{
      shard_id: shard_id,
      retry_backoff: options.retry_backoff,
      max_backoff: options.max_backoff,
      telemetry: Convoy.Telemetry.enabled?()
    }

    Native.subscription_start(fan_out, source.stream_id, options, position, dispatcher)
  end

  def start_reader(source, shard_id, position, dispatcher, options) do
    %{client: client, stream: stream, stream_id: stream_id} = source
    telemetry = Convoy.Telemetry.enabled?()
    options = Map.merge(options, %{stream: stream, shard_id: shard_id, telemetry: telemetry})
    Native.poller_start(client, stream_id, options, position, dispatcher)
  end

  # The reader weighs the next chunk of its batch: most are built here on
  # this scheduler; one with aggregated records (each may unpack into
  # thousands) or a record over 1 MiB is built on a dirty CPU scheduler.
  @impl true
  def take(reader) do
    case Native.reader_take(reader) do
      :dirty -> Native.reader_take_dirty(reader)
      taken -> taken
    end
  end

  @impl true
  def ack(reader), do: Native.reader_ack(reader)

  @impl true
  def stop_reader(reader), do: Native.reader_stop(reader)

  # A cursor is a position, or `{:iterator, iterator}` from an earlier read.
  # Pull reads run in the consumer process: with telemetry on, the NIF
  # reports the GetRecords call to it before its reply, and the report is
  # turned into a `[:convoy, :get_records]` span here.
  @impl true
  def read(%{client: client, stream: stream, stream_id: stream_id}, shard_id, cursor, limit) do
    {position, iterator} =
      case cursor do
        {:iterator, iterator} -> {:trim_horizon, iterator}
        position -> {position, nil}
      end

    telemetry = Convoy.Telemetry.enabled?()

    read =
      &Native.fetch_records(
        client,
        stream,
        stream_id,
        shard_id,
        position,
        iterator,
        limit,
        telemetry,
        &1
      )

    result = Native.call(read, 55_000)
    if telemetry, do: emit_reported_calls(stream, stream_id)

    case result do
      {:ok, {records, next, millis_behind, unparseable}} ->
        Convoy.Consumer.Source.report_unparseable(stream, stream_id, shard_id, unparseable)
        {:ok, records, next && {:iterator, next}, millis_behind}

      {:error, _} = error ->
        error
    end
  end

  defp emit_reported_calls(stream, stream_id) do
    receive do
      {:convoy_get_records, shard_id, call} ->
        metadata = %{
          stream: stream,
          stream_id: stream_id,
          shard_id: shard_id,
          next_iterator: call.next_iterator
        }

        measurements = %{count: call.count, millis_behind_latest: call.millis_behind_latest}

        Convoy.Telemetry.reported(
          [:convoy, :get_records],
          call.duration,
          measurements,
          metadata,
          call.error
        )

        emit_reported_calls(stream, stream_id)
    after
      0 -> :ok
    end
  end
end
