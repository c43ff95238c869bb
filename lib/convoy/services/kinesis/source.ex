defmodule Convoy.Services.Kinesis.Source do
  @moduledoc false
  # Reading Kinesis for Convoy.Consumer: ListShards, and a native poller per
  # shard (a tokio task that sends batches and waits for each ack).
  @behaviour Convoy.Consumer.Source

  alias Convoy.Native

  @impl true
  def list_shards(%{client: client, stream: stream}) do
    Native.call(&Native.list_shards_nif(client, stream, &1, &2))
  end

  @impl true
  def start_reader(%{client: client, stream: stream}, shard_id, position, dispatcher, options) do
    Native.poller_start(
      client,
      %{
        stream_name: stream,
        shard_id: shard_id,
        limit: options.poll_limit,
        poll_interval_ms: options.poll_interval,
        retry_base_ms: options.retry_backoff,
        max_backoff_ms: options.max_backoff
      },
      position,
      dispatcher
    )
  end

  @impl true
  def ack(poller), do: Native.poller_ack(poller)

  @impl true
  def stop_reader(poller), do: Native.poller_stop(poller)

  @impl true
  def fetch(%{client: client, stream: stream}, positions, limit) do
    Native.call(&Native.fetch_records(client, stream, positions, limit, &1, &2), 55_000)
  end
end
