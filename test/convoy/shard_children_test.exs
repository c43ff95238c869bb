defmodule Convoy.ShardChildrenTest do
  # The children a reader names at a shard's end (enhanced fan-out: the last
  # event's ChildShards), seen from the consumer through a scripted source:
  # each shard's reader ends when the test tells it to, with the children
  # the test gives, and the shard listing is whatever the test put in it.
  use ExUnit.Case, async: true

  defmodule Source do
    @moduledoc false
    @behaviour Convoy.Consumer.Source

    @impl true
    def list_shards(%{test: test, shards: shards}) do
      send(test, :listed)
      {:ok, Agent.get(shards, & &1)}
    end

    @impl true
    def start_reader(%{test: test}, shard_id, position, dispatcher, _options) do
      reader =
        spawn(fn ->
          receive do
            {:end, children} -> send(dispatcher, {:convoy_shard_end, shard_id, children})
          end
        end)

      send(test, {:reader, shard_id, reader, position})
      reader
    end

    @impl true
    def ack(_reader), do: :ok

    @impl true
    def stop_reader(reader) do
      Process.exit(reader, :kill)
      :ok
    end

    @impl true
    def read(_source, _shard_id, position, _limit), do: {:ok, [], position, 0}
  end

  @top Integer.pow(2, 128) - 1
  @half div(Integer.pow(2, 128), 2)

  defp shard(id, {from, to}, parents \\ []) do
    %{
      shard_id: id,
      parent_shard_id: Enum.at(parents, 0),
      adjacent_parent_shard_id: Enum.at(parents, 1),
      starting_hash_key: Integer.to_string(from),
      ending_hash_key: Integer.to_string(to),
      ending_sequence_number: nil
    }
  end

  defp start_consumer!(shards) do
    {:ok, agent} = Agent.start_link(fn -> shards end)
    stream_id = "children-#{System.unique_integer([:positive])}"

    start_supervised!(
      {Convoy.Consumer,
       stream_id: stream_id,
       source: {Source, %{test: self(), shards: agent}},
       checkpoint: {Convoy.Checkpoint.Memory, []},
       iterator_type: :trim_horizon,
       poll_interval: 100,
       shard_refresh_interval: 600_000}
    )

    consumer = Convoy.Consumer.name(stream_id)
    :ok = Convoy.Consumer.attach(consumer, :h, fn _record, _config -> :ok end, nil, [])
    assert_receive :listed, 5_000
  end

  defp assert_reader(shard_id) do
    assert_receive {:reader, ^shard_id, reader, _position}, 5_000
    reader
  end

  test "a split: the children named at the parent's end start without a listing" do
    # The listing was made before the split: it shows the parent alone.
    start_consumer!([shard("shardId-0", {0, @top})])
    parent = assert_reader("shardId-0")

    children = [
      shard("shardId-1", {0, @half - 1}, ["shardId-0"]),
      shard("shardId-2", {@half, @top}, ["shardId-0"])
    ]

    send(parent, {:end, children})
    assert_receive {:reader, "shardId-1", _, :trim_horizon}, 5_000
    assert_receive {:reader, "shardId-2", _, :trim_horizon}, 5_000
    refute_received :listed
  end

  test "a merge named by one parent only: the shards are listed, the child waits for both" do
    left = shard("shardId-0", {0, @half - 1})
    right = shard("shardId-1", {@half, @top})
    child = shard("shardId-2", {0, @top}, ["shardId-0", "shardId-1"])
    start_consumer!([left, right, child])
    left_reader = assert_reader("shardId-0")
    right_reader = assert_reader("shardId-1")

    # The right parent's end names the child with itself as its only
    # parent, though the child's hash key range is wider than the right
    # parent's: an incomplete ChildShards, scripted here. (The embedded
    # emulator no longer sends one: its SubscribeToShard, served by
    # native/convoy_local/src/subscribe.rs, names every parent of a child.)
    named = %{child | parent_shard_id: "shardId-1", adjacent_parent_shard_id: nil}
    send(right_reader, {:end, [named]})
    assert_receive :listed, 5_000
    refute_receive {:reader, "shardId-2", _, _}, 500

    send(left_reader, {:end, [child]})
    assert_reader("shardId-2")
  end
end
