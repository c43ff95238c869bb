defmodule Convoy.UnparseableTest do
  # Records that look aggregated but cannot be unpacked: logged, counted,
  # and the shard goes on.
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  @magic <<0xF3, 0x89, 0x9A, 0xC2>>

  # A KPL aggregated record around `proto`, with its MD5 trailer.
  defp aggregated(proto), do: @magic <> proto <> :erlang.md5(proto)

  # An AggregatedRecord with a partition key table and no record in it.
  defp empty_aggregate, do: aggregated(<<0x0A, 1, "k">>)

  # One user record "inside" with key "k"; the last digest byte flipped.
  defp bad_checksum do
    record = <<0x08, 0x00, 0x1A, 6, "inside">>
    good = aggregated(<<0x0A, 1, "k", 0x1A, byte_size(record)>> <> record)
    size = byte_size(good) - 1
    <<head::binary-size(size), last>> = good
    head <> <<Bitwise.bxor(last, 1)>>
  end

  # A queue's id is not its stream's name, so events can be seen to carry both.
  defp queue_id(stream), do: {:unparseable, stream}

  defp start_queue!(stream, opts) do
    id = queue_id(stream)

    opts =
      [
        stream: stream,
        stream_id: id,
        kinesis: kinesis(),
        iterator_type: :trim_horizon,
        batch_timeout: 0
      ] ++ opts

    start_supervised!({Convoy.Queue, opts}, id: stream)
    id
  end

  # The `[:convoy, :record, :unparseable]` events of queue `id` until their
  # counts add up to `total`, then none more: [{count, metadata}].
  defp unparseable_events(id, total, acc \\ []) do
    if acc |> Enum.map(&elem(&1, 0)) |> Enum.sum() >= total do
      refute_receive {:telemetry_event, [:convoy, :record, :unparseable], _, %{stream_id: ^id}},
                     500

      Enum.reverse(acc)
    else
      receive do
        {:telemetry_event, [:convoy, :record, :unparseable], %{count: n}, %{stream_id: ^id} = m} ->
          unparseable_events(id, total, [{n, m} | acc])
      after
        10_000 -> flunk("unparseable events so far: #{inspect(Enum.reverse(acc))}")
      end
    end
  end

  # One event or two, counting the two records, each named with its reason.
  defp assert_unparseable_counted(stream, id) do
    events = unparseable_events(id, 2)
    assert events |> Enum.map(&elem(&1, 0)) |> Enum.sum() == 2

    for {n, m} <- events do
      assert m.stream == stream
      assert m.shard_id == "shardId-000000000000"
      assert length(m.records) == n
    end

    reasons = for {_, m} <- events, {_seq, reason} <- m.records, do: reason
    assert Enum.sort(reasons) == [:bad_checksum, :empty_aggregate]
  end

  defp put_all!(id) do
    for data <- [empty_aggregate(), bad_checksum(), "plain"] do
      assert {:ok, _} = Convoy.Queue.put(id, "k", data, await: 10_000)
    end
  end

  test "an empty aggregated record delivers nothing, a bad checksum one is delivered plain; the shard goes on" do
    stream = create_stream!(unique_stream("unparseable"), 1)
    Convoy.TestTelemetry.subscribe()
    me = self()
    bad = bad_checksum()

    log =
      capture_log(fn ->
        id = start_queue!(stream, poll_interval: 100)
        put_all!(id)

        :ok = Convoy.Queue.attach_handler(id, :h, fn r, _ -> send(me, {:got, r}) end, nil)

        assert_receive {:got, %Convoy.Record{data: ^bad, sub_sequence_number: nil}}, 10_000
        assert_receive {:got, %Convoy.Record{data: "plain"}}, 10_000
        refute_receive {:got, _}, 1_000
      end)

    assert log =~ "could not be unpacked"
    assert log =~ ":empty_aggregate"
    assert log =~ ":bad_checksum"
    # Neither a crash nor a restart of the shard (the log holds other
    # tests' lines too: only this stream's count).
    id = queue_id(stream)
    refute log =~ ~r/#{Regex.escape(inspect(id))}: dispatcher .* exited/
    refute log =~ ~r/#{Regex.escape(inspect(id))}: .*panicked/
    assert_unparseable_counted(stream, id)
  end

  test "get/2 does the same" do
    stream = create_stream!(unique_stream("unparseable-get"), 1)
    Convoy.TestTelemetry.subscribe()
    bad = bad_checksum()

    log =
      capture_log(fn ->
        id = start_queue!(stream, [])
        put_all!(id)
        assert [%{data: ^bad}, %{data: "plain"}] = Convoy.Queue.get(id, 10)
        assert Convoy.Queue.get(id, 10) == []
      end)

    assert log =~ ":empty_aggregate"
    assert log =~ ":bad_checksum"
    assert_unparseable_counted(stream, queue_id(stream))
  end
end
