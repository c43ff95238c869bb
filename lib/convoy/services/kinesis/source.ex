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
    telemetry = Convoy.Telemetry.enabled?()
    options = Map.merge(options, %{stream: stream, shard_id: shard_id, telemetry: telemetry})
    Native.poller_start(client, stream_id, options, position, dispatcher)
  end

  @impl true
  def ack(poller), do: Native.poller_ack(poller)

  @impl true
  def stop_reader(poller), do: Native.poller_stop(poller)

  @impl true
  def fetch(%{client: client, stream: stream, stream_id: stream_id}, positions, limit) do
    Native.call(&Native.fetch_records(client, stream, stream_id, positions, limit, &1), 55_000)
  end
end
