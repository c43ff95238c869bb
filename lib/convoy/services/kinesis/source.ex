defmodule Convoy.Services.Kinesis.Source do
  @moduledoc false
  # Reading Kinesis for Convoy.Consumer: ListShards, and a native poller per
  # shard (a tokio task that sends batches and waits for each ack).
  @behaviour Convoy.Consumer.Source

  alias Convoy.Native

  @impl true
  def list_shards(%{client: client, stream: stream}) do
    Native.call(&Native.list_shards_nif(client, stream, &1))
  end

  @impl true
  def start_reader(source, shard_id, position, dispatcher, options) do
    %{client: client, stream: stream, stream_id: stream_id} = source
    options = Map.merge(options, %{stream: stream, shard_id: shard_id})
    Native.poller_start(client, stream_id, options, position, dispatcher)
  end

  @impl true
  def ack(poller), do: Native.poller_ack(poller)

  @impl true
  def stop_reader(poller), do: Native.poller_stop(poller)

  # A cursor is a position, or `{:iterator, iterator}` from an earlier read.
  @impl true
  def read(%{client: client, stream: stream, stream_id: stream_id}, shard_id, cursor, limit) do
    {position, iterator} =
      case cursor do
        {:iterator, iterator} -> {:trim_horizon, iterator}
        position -> {position, nil}
      end

    read =
      &Native.fetch_records(client, stream, stream_id, shard_id, position, iterator, limit, &1)

    case Native.call(read, 55_000) do
      {:ok, {records, next, millis_behind, unparseable}} ->
        Convoy.Consumer.Source.report_unparseable(stream_id, shard_id, unparseable)
        {:ok, records, next && {:iterator, next}, millis_behind}

      {:error, _} = error ->
        error
    end
  end
end
