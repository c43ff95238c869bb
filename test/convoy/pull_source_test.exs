defmodule Convoy.PullSourceTest do
  # get/2's reading rules, against a scripted source: what each read of a
  # shard answers is given in advance, and every read is recorded.
  use ExUnit.Case, async: true

  @moduletag :capture_log

  defmodule Scripted do
    @moduledoc false
    @behaviour Convoy.Consumer.Source

    def start_link(shards, answers) do
      Agent.start_link(fn -> %{shards: shards, answers: answers, reads: []} end)
    end

    def reads(agent), do: agent |> Agent.get(& &1.reads) |> Enum.reverse()

    @impl true
    def list_shards(agent), do: {:ok, Agent.get(agent, & &1.shards)}

    # An answer `{:slow, ms, answer}` comes after `ms`.
    @impl true
    def read(agent, shard_id, cursor, limit) do
      case next_answer(agent, shard_id, cursor, limit) do
        {:slow, ms, answer} ->
          Process.sleep(ms)
          answer

        answer ->
          answer
      end
    end

    defp next_answer(agent, shard_id, cursor, limit) do
      Agent.get_and_update(agent, fn state ->
        read = %{shard_id: shard_id, cursor: cursor, limit: limit, at: now()}
        state = %{state | reads: [read | state.reads]}

        case Map.get(state.answers, shard_id, []) do
          [answer | rest] -> {answer, put_in(state.answers[shard_id], rest)}
          # Caught up, at the same cursor.
          [] -> {{:ok, [], cursor, 0}, state}
        end
      end)
    end

    @impl true
    def start_reader(_, _, _, _, _), do: nil
    @impl true
    def ack(_), do: :ok
    @impl true
    def stop_reader(_), do: :ok

    defp now, do: System.monotonic_time(:millisecond)
  end

  defp shard(id, parent \\ nil),
    do: %{shard_id: id, parent_shard_id: parent, adjacent_parent_shard_id: nil}

  defp record(shard_id, seq, data, sub \\ nil) do
    %Convoy.Record{
      data: data,
      partition_key: "k",
      sequence_number: seq,
      shard_id: shard_id,
      sub_sequence_number: sub
    }
  end

  defp start!(shards, answers) do
    {:ok, agent} = Scripted.start_link(shards, answers)
    id = {:scripted, make_ref()}

    start_supervised!(
      Supervisor.child_spec(
        {Convoy.Consumer,
         stream_id: id,
         source: {Scripted, agent},
         checkpoint: {Convoy.Checkpoint.Memory, []},
         iterator_type: :trim_horizon},
        id: id
      )
    )

    {Convoy.Consumer.name(id), id, agent}
  end

  defp checkpoint(id, shard_id),
    do: Convoy.Checkpoint.Memory.fetch(Convoy.Checkpoint.Memory, id, shard_id)

  test "follows the iterator across empty answers, 200 ms apart, within one call" do
    answers = %{
      "a" => [
        {:ok, [], {:it, 1}, 9_000},
        {:ok, [], {:it, 2}, 8_000},
        {:ok, [record("a", "10", "x"), record("a", "11", "y")], {:it, 3}, 0}
      ]
    }

    {consumer, id, agent} = start!([shard("a")], answers)
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["x", "y"]

    reads = Scripted.reads(agent)
    assert Enum.map(reads, & &1.cursor) == [:trim_horizon, {:it, 1}, {:it, 2}]
    gaps = reads |> Enum.map(& &1.at) |> Enum.chunk_every(2, 1, :discard)
    assert Enum.all?(gaps, fn [a, b] -> b - a >= 200 end)
    assert checkpoint(id, "a") == {:ok, "11"}

    # The next call goes on from the iterator, not from a new one.
    assert Convoy.Consumer.get(consumer, 10) == []
    assert List.last(Scripted.reads(agent)).cursor == {:it, 3}
  end

  test "takes turns between shards, the first shard rotating from call to call" do
    many = fn shard_id ->
      for i <- 1..4, do: {:ok, [record(shard_id, "#{i}", "#{shard_id}#{i}")], {:it, i}, 1_000}
    end

    {consumer, _id, _agent} =
      start!([shard("a"), shard("b")], %{"a" => many.("a"), "b" => many.("b")})

    assert Enum.map(Convoy.Consumer.get(consumer, 2), & &1.data) == ["a1", "b1"]
    assert Enum.map(Convoy.Consumer.get(consumer, 2), & &1.data) == ["b2", "a2"]
  end

  test "limit counts user records: the rest of an aggregated record waits; each call checkpoints its last user record" do
    users = for sub <- 0..4, do: record("a", "7", "u#{sub}", sub)
    {consumer, id, _agent} = start!([shard("a")], %{"a" => [{:ok, users, {:it, 1}, 0}]})

    # With its sub-sequence number: a restart goes on with the next one.
    assert Enum.map(Convoy.Consumer.get(consumer, 2), & &1.data) == ["u0", "u1"]
    assert checkpoint(id, "a") == {:ok, {"7", 1}}
    assert Enum.map(Convoy.Consumer.get(consumer, 2), & &1.data) == ["u2", "u3"]
    assert checkpoint(id, "a") == {:ok, {"7", 3}}
    assert Enum.map(Convoy.Consumer.get(consumer, 2), & &1.data) == ["u4"]
    assert checkpoint(id, "a") == {:ok, {"7", 4}}
  end

  test "a failed cursor is replaced by the position after the last record received" do
    answers = %{
      "a" => [
        {:ok, [record("a", "5", "x")], {:it, 1}, 0},
        {:error, {:aws, "ExpiredIteratorException", "expired"}},
        {:ok, [record("a", "6", "y")], {:it, 2}, 0}
      ]
    }

    {consumer, _id, agent} = start!([shard("a")], answers)
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["x"]
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["y"]

    assert Enum.map(Scripted.reads(agent), & &1.cursor) ==
             [:trim_horizon, {:it, 1}, {:after_sequence_number, "5"}]
  end

  test "a throttled read ends the call with what was read, and the next call reads on from there" do
    throttled = {:error, {:aws, "ProvisionedThroughputExceededException", "Rate exceeded"}}

    answers = %{
      "a" => [
        {:ok, [record("a", "1", "x")], {:it, 1}, 500},
        throttled,
        throttled,
        {:ok, [record("a", "2", "y")], {:it, 2}, 0}
      ]
    }

    {consumer, id, agent} = start!([shard("a")], answers)
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["x"]
    assert checkpoint(id, "a") == {:ok, "1"}
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["y"]

    assert Enum.map(Scripted.reads(agent), & &1.cursor) == [
             :trim_horizon,
             {:it, 1},
             {:after_sequence_number, "1"},
             {:after_sequence_number, "1"}
           ]

    # Nothing read, only throttled: the call answers the error.
    {consumer, _id, _agent} = start!([shard("b")], %{"b" => [throttled]})
    assert Convoy.Consumer.get(consumer, 10) == throttled
  end

  test "slow reads: a call returns what it read within 20 s, and the next one reads on from there" do
    # Three shards, every read 7 s: 10 rounds would take 210 s.
    answers =
      Map.new(~w(a b c), fn shard_id ->
        {shard_id,
         for(
           i <- 1..3,
           do: {:slow, 7_000, {:ok, [record(shard_id, "#{i}", "#{shard_id}#{i}")], {:it, i}, 500}}
         )}
      end)

    {consumer, id, agent} = start!([shard("a"), shard("b"), shard("c")], answers)
    first = Convoy.Consumer.get(consumer, 100)
    # The third read started past 14 s, the budget was spent after it.
    assert Enum.sort(Enum.map(first, & &1.data)) == ["a1", "b1", "c1"]
    assert length(Scripted.reads(agent)) == 3
    assert checkpoint(id, "a") == {:ok, "1"}

    second = Convoy.Consumer.get(consumer, 100)
    assert Enum.sort(Enum.map(second, & &1.data)) == ["a2", "b2", "c2"]
    assert checkpoint(id, "c") == {:ok, "2"}
  end

  test "a shard read to its end is checkpointed :shard_end and its child is read in the same call" do
    answers = %{
      "p" => [{:ok, [record("p", "1", "parent")], nil, 0}],
      "c" => [{:ok, [record("c", "2", "child")], {:it, 1}, 0}]
    }

    {consumer, id, _agent} = start!([shard("p"), shard("c", "p")], answers)
    assert Enum.map(Convoy.Consumer.get(consumer, 10), & &1.data) == ["parent", "child"]
    assert checkpoint(id, "p") == {:ok, :shard_end}
    assert checkpoint(id, "c") == {:ok, "2"}
  end
end
