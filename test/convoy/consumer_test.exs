defmodule Convoy.ConsumerTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  defp start_queue!(stream, opts) do
    opts =
      Keyword.merge(
        [stream: stream, kinesis: kinesis(), iterator_type: :trim_horizon, poll_interval: 100],
        opts
      )

    start_supervised!({Convoy.Queue, opts}, id: Keyword.get(opts, :stream_id, stream))
    Keyword.get(opts, :stream_id, stream)
  end

  defp forward(tag) do
    me = self()
    fn record, config -> send(me, {tag, config, record}) end
  end

  defp collect(tag, count, acc \\ []) do
    if count == 0 do
      Enum.reverse(acc)
    else
      receive do
        {^tag, _config, record} -> collect(tag, count - 1, [record | acc])
      after
        30_000 -> flunk("received #{length(acc)} records, #{count} missing")
      end
    end
  end

  @tag timeout: 600_000
  test "50,000 records (at full volume) written by the raw SDK reach a function handler exactly once, in shard order" do
    stream = create_stream!(unique_stream("consume"), 4)
    count = volume(50_000)
    raw_put!(stream, count, keys: 64)
    id = start_queue!(stream, [])
    :ok = Convoy.Queue.attach_handler(id, :all, forward(:rec), :cfg)

    records = collect(:rec, count)
    refute_receive {:rec, _, _}, 500

    assert Enum.map(records, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..(count - 1), do: "record-#{i}")

    for {_shard, group} <- Enum.group_by(records, & &1.shard_id) do
      seqs = Enum.map(group, &String.to_integer(&1.sequence_number))
      assert seqs == Enum.sort(seqs)
    end

    assert Enum.all?(
             records,
             &match?(
               %Convoy.Record{stream_id: ^id, approximate_arrival_timestamp: %DateTime{}},
               &1
             )
           )

    assert Enum.all?(
             records,
             &(&1.partition_key ==
                 "key-#{rem(String.to_integer(String.trim_leading(&1.data, "record-")), 64)}")
           )
  end

  test "a pid handler gets one batch per shard at a time and reads on only after its ack" do
    stream = create_stream!(unique_stream("pid"), 1)
    raw_put!(stream, 30)
    id = start_queue!(stream, poll_limit: 10)
    :ok = Convoy.Queue.attach_handler(id, :pid, self(), nil)

    assert_receive {:convoy_batch, %Convoy.Batch{records: first, handler_id: :pid} = batch},
                   10_000

    assert length(first) == 10
    # Unacknowledged: nothing more comes, however long we wait.
    refute_receive {:convoy_batch, _}, 1_000
    assert {:message_queue_len, 0} = Process.info(batch.dispatcher, :message_queue_len)
    Convoy.Queue.ack(batch)

    assert_receive {:convoy_batch, second}, 10_000
    Convoy.Queue.ack(second)
    assert_receive {:convoy_batch, third}, 10_000
    Convoy.Queue.ack(third)

    datas = Enum.map(first ++ second.records ++ third.records, & &1.data)
    assert datas == for(i <- 0..29, do: "record-#{i}")
  end

  test "a slow handler bounds memory: the mailbox and the native buffers hold one batch" do
    stream = create_stream!(unique_stream("slow"), 1)
    raw_put!(stream, 2_000)
    id = start_queue!(stream, poll_limit: 100)
    me = self()

    slow = fn record, _ ->
      Process.sleep(2)
      send(me, {:slow, record.data, Process.info(self(), :message_queue_len)})
    end

    :ok = Convoy.Queue.attach_handler(id, :slow, slow, nil)

    lengths =
      for _ <- 1..500 do
        assert_receive {:slow, _data, {:message_queue_len, len}}, 10_000
        len
      end

    # Only control messages may wait: never a second batch of records.
    assert Enum.max(lengths) <= 1
  end

  # Records are built in Rust: small data as heap binaries, data up to
  # 4 KiB as sub-binaries of binaries the records of a batch share (several
  # here), larger data as a binary of its own.
  test "records of every size are whole %Convoy.Record{} structs, and stay valid after the handler returns" do
    stream = create_stream!(unique_stream("sizes"), 1)
    id = start_queue!(stream, [])
    sizes = [0, 1, 64, 65, 100, 4096, 4097, 70_000] ++ List.duplicate(1000, 150) ++ [65, 100]
    datas = for {size, i} <- Enum.with_index(sizes), do: :binary.copy(<<rem(i, 251)>>, size)
    kept = :ets.new(:kept, [:public, :ordered_set])

    :ok =
      Convoy.Queue.attach_handler(
        id,
        :keep,
        fn record, table -> :ets.insert(table, {:ets.info(table, :size), record}) end,
        kept
      )

    for data <- datas, do: :ok = put_until_accepted(id, "k", data)

    eventually(fn -> :ets.info(kept, :size) == length(datas) end)
    # The dispatcher and every other process collect their garbage: the
    # kept records must not depend on anything the batch held.
    for pid <- Process.list(), do: :erlang.garbage_collect(pid)
    records = for {_, record} <- :ets.tab2list(kept), do: record

    assert Enum.map(records, & &1.data) == datas

    # What a kept record keeps alive: at most 64 KiB of its batch's data.
    assert Enum.all?(records, fn %{data: data} ->
             :binary.referenced_byte_size(data) <= max(64 * 1024, byte_size(data))
           end)

    assert Enum.any?(records, &(:binary.referenced_byte_size(&1.data) > byte_size(&1.data)))

    for record <- records do
      assert %Convoy.Record{stream_id: ^id, partition_key: "k", sub_sequence_number: nil} = record
      assert %DateTime{} = record.approximate_arrival_timestamp
      assert is_nil(record.explicit_hash_key)
      assert record.shard_id == "shardId-000000000000"

      assert Map.keys(record) |> Enum.sort() ==
               Map.keys(%Convoy.Record{
                 data: "",
                 partition_key: "",
                 sequence_number: "",
                 shard_id: ""
               })
               |> Enum.sort()

      assert record == struct!(Convoy.Record, Map.from_struct(record))
      assert record == record |> :erlang.term_to_binary() |> :erlang.binary_to_term()
    end
  end

  test "plain records are built on the dispatcher's scheduler, aggregated ones on a dirty one" do
    stream = create_stream!(unique_stream("take"), 1)
    id = start_queue!(stream, aggregation: true, batch_timeout: 0)
    me = self()
    forward = fn record, _ -> send(me, {:got, record.data, record.sub_sequence_number}) end
    :ok = Convoy.Queue.attach_handler(id, :h, forward, nil)

    dispatcher = only_dispatcher(id)

    # Calls of the two NIFs by the dispatcher, with what they returned.
    for name <- [:reader_take, :reader_take_dirty] do
      1 = :erlang.trace_pattern({Convoy.Native, name, 1}, [{:_, [], [{:return_trace}]}], [:local])
    end

    on_exit(fn -> :erlang.trace_pattern({Convoy.Native, :_, :_}, false, [:local]) end)
    1 = :erlang.trace(dispatcher, true, [:call, {:tracer, me}])

    # Plain records, written by the raw SDK: a light batch.
    raw_put!(stream, 3, keys: 1)
    for i <- 0..2, do: assert_receive({:got, "record-" <> _, nil}, 10_000) && i
    assert_receive {:trace, ^dispatcher, :return_from, {Convoy.Native, :reader_take, 1}, {_, []}}
    # Then the dispatcher asks for the next chunk and learns there is none.
    assert_receive {:trace, ^dispatcher, :return_from, {Convoy.Native, :reader_take, 1}, :done}
    refute_received {:trace, ^dispatcher, :call, {Convoy.Native, :reader_take_dirty, _}}

    # An aggregated record: heavy whatever its size, it may unpack into many.
    assert {:ok, %{sub_sequence_number: 0}} = Convoy.Queue.put(id, "k", "agg", await: 10_000)
    assert_receive {:got, "agg", 0}, 10_000
    assert_receive {:trace, ^dispatcher, :return_from, {Convoy.Native, :reader_take, 1}, :dirty}

    assert_receive {:trace, ^dispatcher, :return_from, {Convoy.Native, :reader_take_dirty, 1},
                    {[%Convoy.Record{data: "agg"}], []}}

    refute_receive {:got, _, _}, 500
  end

  # A checkpoint store that tells the test process of each store.
  defmodule Stores do
    @behaviour Convoy.Checkpoint

    @impl true
    def init(options), do: {:ok, Keyword.fetch!(options, :to)}

    @impl true
    def fetch(_to, _stream_id, _shard_id), do: :error

    @impl true
    def store(to, _stream_id, shard_id, position) do
      send(to, {:stored, shard_id, position})
      :ok
    end
  end

  # The measurements of `event` for the queue `id` received so far.
  defp events(event, id) do
    receive do
      {:telemetry_event, ^event, measurements, %{stream_id: ^id}} ->
        [measurements | events(event, id)]
    after
      0 -> []
    end
  end

  test "a large batch reaches the handlers in chunks of at most 500 records, checkpointed once" do
    stream = create_stream!(unique_stream("chunks"), 1)
    # Written before the queue starts, so that one GetRecords call reads them.
    raw_put!(stream, 1_200, keys: 1)
    Convoy.TestTelemetry.subscribe()
    id = start_queue!(stream, checkpoint: {Stores, to: self()})
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)

    records = collect(:h, 1_200)
    assert Enum.map(records, & &1.data) == for(i <- 0..1_199, do: "record-#{i}")
    last = List.last(records).sequence_number
    assert_receive {:stored, _, ^last}, 10_000
    refute_receive {:h, _, _}, 500

    reads =
      for %{count: count} <- events([:convoy, :get_records, :stop], id), count > 0, do: count

    chunks = for %{count: count} <- events([:convoy, :handler, :stop], id), do: count
    batches = for %{count: count} <- events([:convoy, :batch, :stop], id), do: count
    assert Enum.max(reads) > 500
    assert Enum.all?(chunks, &(&1 <= 500))
    assert Enum.sum(chunks) == 1_200

    # One checkpoint per batch read (the last one received above), none per
    # chunk.
    assert batches == reads
    assert 1 + length(flush_stored()) == length(reads)
  end

  # A queue whose pid handler acked the first chunk of a batch of 1,200
  # records and holds the second. Answers the queue and the first chunk's
  # last sequence number.
  defp hold_second_chunk!(prefix) do
    stream = create_stream!(unique_stream(prefix), 1)
    raw_put!(stream, 1_200, keys: 1)
    me = self()

    handler =
      spawn_link(fn ->
        receive do
          {:convoy_batch, batch} ->
            send(me, {:first, batch.records})
            Convoy.Queue.ack(batch)
        end

        receive do
          {:convoy_batch, batch} -> send(me, {:second, batch.records})
        end

        Process.sleep(:infinity)
      end)

    id = start_queue!(stream, checkpoint: {Stores, to: self()})
    :ok = Convoy.Queue.attach_handler(id, :h, handler, nil)
    assert_receive {:first, first}, 10_000
    assert_receive {:second, [%{data: "record-500"} | _]}, 10_000
    assert Enum.map(first, & &1.data) == for(i <- 0..499, do: "record-#{i}")
    refute_received {:stored, _, _}
    {id, List.last(first).sequence_number}
  end

  test "a stop while a chunk is held stores the checkpoint of the chunks finished before it" do
    {id, last} = hold_second_chunk!("chunk-stop")
    :ok = stop_supervised(id)
    assert_receive {:stored, _, ^last}, 1_000
    refute_receive {:stored, _, _}, 500
  end

  test "a reader stopped by an error: the chunks finished are stored all the same" do
    {id, last} = hold_second_chunk!("chunk-fail")

    log =
      capture_log(fn ->
        send(only_dispatcher(id), {:convoy_poller_stopped, "shardId-000000000000", :boom})
        assert_receive {:stored, _, ^last}, 1_000
        refute_receive {:stored, _, _}, 500
      end)

    assert log =~ "stopped"
  end

  defp flush_stored do
    receive do
      {:stored, _, _} = stored -> [stored | flush_stored()]
    after
      0 -> []
    end
  end

  test "a reader let run ahead by an extra acknowledgement loses no batch" do
    stream = create_stream!(unique_stream("ahead"), 1)
    id = start_queue!(stream, poll_interval: 50)
    me = self()

    handler = fn record, _ ->
      if record.data == "record-0" do
        send(me, {:holding, self()})

        receive do
          :go -> :ok
        end
      end

      send(me, {:got, record.data})
    end

    :ok = Convoy.Queue.attach_handler(id, :h, handler, nil)

    dispatcher = only_dispatcher(id)

    reader = :sys.get_state(dispatcher).reader
    reads_with = fn count -> fn -> dispatcher |> reads() |> Enum.member?(count) end end

    # The first batch holds the dispatcher in its handler.
    raw_put!(stream, 1, keys: 1)
    assert_receive {:holding, ^dispatcher}, 10_000

    # Two extra acknowledgements: the reader reads two more batches while
    # the dispatcher has not taken the first of them.
    raw_put!(stream, 2, keys: 1, start: 1)
    :ok = Convoy.Native.reader_ack(reader)
    eventually(reads_with.(2), 10_000)
    raw_put!(stream, 3, keys: 1, start: 3)
    :ok = Convoy.Native.reader_ack(reader)
    eventually(reads_with.(3), 10_000)

    send(dispatcher, :go)
    got = for _ <- 1..6, do: assert_receive({:got, data}, 10_000) && data
    assert got == for(i <- 0..5, do: "record-#{i}")
    refute_receive {:got, _}, 1_000
  end

  test "a reader run ahead while a pid handler holds the batch does not replace it" do
    stream = create_stream!(unique_stream("ahead-pid"), 1)
    Convoy.TestTelemetry.subscribe()
    id = start_queue!(stream, poll_interval: 50)
    me = self()

    # A pid handler that holds each batch until told, then a function
    # handler after it.
    holder =
      spawn_link(fn ->
        for _ <- 1..2 do
          receive do
            {:convoy_batch, batch} ->
              send(me, {:holding, Enum.map(batch.records, & &1.data)})

              receive do
                :go -> Convoy.Queue.ack(batch)
              end
          end
        end
      end)

    :ok = Convoy.Queue.attach_handler(id, :holder, holder, nil)
    :ok = Convoy.Queue.attach_handler(id, :after, forward(:after), nil)
    reader = :sys.get_state(only_dispatcher(id)).reader

    raw_put!(stream, 1, keys: 1)
    assert_receive {:holding, ["record-0"]}, 10_000

    # An extra acknowledgement: the reader reads and announces the next
    # batch while the first is still held.
    raw_put!(stream, 2, keys: 1, start: 1)
    :ok = Convoy.Native.reader_ack(reader)

    assert_receive {:telemetry_event, [:convoy, :get_records, :stop], %{count: 2},
                    %{stream_id: ^id}},
                   10_000

    send(holder, :go)
    assert_receive {:holding, ["record-1", "record-2"]}, 10_000
    send(holder, :go)

    got = for record <- collect(:after, 3), do: record.data
    assert got == ["record-0", "record-1", "record-2"]
    refute_receive {:after, _, _}, 1_000
  end

  # The record counts of the GetRecords calls reported to a blocked
  # dispatcher (telemetry is on in the tests), from its mailbox.
  defp reads(dispatcher) do
    {:messages, messages} = Process.info(dispatcher, :messages)
    for {:convoy_get_records, _, %{count: count}} <- messages, do: count
  end

  test "partition-key filters: one key, a list of keys, a predicate" do
    stream = create_stream!(unique_stream("filter"), 2)
    id = start_queue!(stream, [])
    :ok = Convoy.Queue.attach_handler(id, :one, forward(:one), nil, partition_keys: "key-1")

    :ok =
      Convoy.Queue.attach_handler(id, :list, forward(:list), nil,
        partition_keys: ["key-2", "key-3"]
      )

    :ok =
      Convoy.Queue.attach_handler(id, :pred, forward(:pred), nil,
        partition_keys: &String.ends_with?(&1, "0")
      )

    # Written once every handler is attached: a batch goes to the handlers
    # attached when it is read.
    raw_put!(stream, 400, keys: 4)

    assert collect(:one, 100) |> Enum.all?(&(&1.partition_key == "key-1"))
    assert collect(:list, 200) |> Enum.all?(&(&1.partition_key in ["key-2", "key-3"]))
    assert collect(:pred, 100) |> Enum.all?(&(&1.partition_key == "key-0"))
    refute_receive {_, _, %Convoy.Record{}}, 500
  end

  test "a raising handler is logged with its stacktrace and detached; others go on" do
    stream = create_stream!(unique_stream("raise"), 1)
    id = start_queue!(stream, [])
    me = self()

    log =
      capture_log(fn ->
        :ok = Convoy.Queue.attach_handler(id, :bad, fn _r, _c -> raise "boom" end, nil)
        :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)
        raw_put!(stream, 20)
        assert length(collect(:good, 20)) == 20
        # The failed handler is gone: attaching under its id works again.
        eventually(fn ->
          Convoy.Queue.attach_handler(id, :bad, fn r, _ -> send(me, {:bad_again, r}) end, nil) ==
            :ok
        end)
      end)

    assert log =~ "handler :bad failed"
    assert log =~ "boom"
    assert log =~ "consumer_test.exs"

    assert Convoy.Queue.attach_handler(id, :good, forward(:good), nil, []) ==
             {:error, :already_exists}

    assert Convoy.Queue.detach_handler(id, :missing, strict: true) == {:error, :not_found}
  end

  test "on_error: :retry calls the handler again until it succeeds" do
    stream = create_stream!(unique_stream("retry"), 1)
    id = start_queue!(stream, [])
    me = self()
    counter = :counters.new(1, [])

    flaky = fn record, _ ->
      :counters.add(counter, 1, 1)
      if :counters.get(counter, 1) < 3, do: raise("transient")
      send(me, {:flaky, record.data})
    end

    capture_log(fn ->
      :ok = Convoy.Queue.attach_handler(id, :flaky, flaky, nil, on_error: :retry)
      raw_put!(stream, 1)
      assert_receive {:flaky, "record-0"}, 10_000
    end)
  end

  test "detach stops polling and attach resumes where reading stopped, without a gap" do
    stream = create_stream!(unique_stream("reattach"), 2)
    id = start_queue!(stream, iterator_type: :latest)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)
    raw_put!(stream, 50)
    first = collect(:h, 50)
    :ok = Convoy.Queue.detach_handler(id, :h)
    raw_put!(stream, 50, start: 50)
    refute_receive {:h, _, _}, 500
    :ok = Convoy.Queue.attach(id, :h, forward(:h), nil)
    second = collect(:h, 50)
    datas = Enum.map(first ++ second, & &1.data) |> Enum.sort()
    assert datas == Enum.sort(for i <- 0..99, do: "record-#{i}")
  end

  test "get/2 pulls records across shards and advances" do
    stream = create_stream!(unique_stream("get"), 2)
    raw_put!(stream, 30)
    id = start_queue!(stream, poll_interval: nil)
    first = Convoy.Queue.get(id, 20)
    assert length(first) == 20
    rest = Convoy.Queue.get(id, 20)
    assert length(rest) == 10
    assert Convoy.Queue.get(id, 5) == []

    assert Enum.map(first ++ rest, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 0..29, do: "record-#{i}")

    assert Convoy.Queue.get(id, 0) == {:error, {:invalid_limit, 0}}
  end

  @tag :tmp_dir
  test "with the file checkpoint store, a restarted queue resumes after its checkpoint", %{
    tmp_dir: dir
  } do
    stream = create_stream!(unique_stream("checkpoint"), 2)
    raw_put!(stream, 100)
    opts = [stream: stream, kinesis: kinesis(), iterator_type: :trim_horizon, poll_interval: 100]
    opts = opts ++ [checkpoint: {Convoy.Checkpoint.File, dir: dir}]

    {:ok, pid} = Convoy.Queue.start_link(opts)
    :ok = Convoy.Queue.attach_handler(stream, :h, forward(:h), nil)
    first = collect(:h, 100)
    Process.unlink(pid)
    GenServer.stop(pid)

    raw_put!(stream, 100, start: 100)
    {:ok, pid} = Convoy.Queue.start_link(opts)
    :ok = Convoy.Queue.attach_handler(stream, :h, forward(:h), nil)
    second = collect(:h, 100)
    refute_receive {:h, _, _}, 500

    assert Enum.map(second, & &1.data) |> Enum.sort() ==
             Enum.sort(for i <- 100..199, do: "record-#{i}")

    assert length(first) == 100
    GenServer.stop(pid)
  end

  test "splitting a shard: every record arrives, the parent's before its children's" do
    stream = create_stream!(unique_stream("split"), 1)
    id = start_queue!(stream, shard_refresh_interval: 500)
    :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)
    raw_put!(stream, 100)
    consumed_before_split = collect(:h, 100)

    # Records the queue has not read yet when the shard splits...
    raw_put!(stream, 100, start: 100)
    {:ok, [%{shard_id: parent}]} = Convoy.Local.list_shards(endpoint(), stream)

    :ok =
      Convoy.Local.split_shard(
        endpoint(),
        stream,
        parent,
        "170141183460469231731687303715884105728"
      )

    # ...and records that go to the children.
    raw_put!(stream, 200, start: 200)

    rest = collect(:h, 300)
    {from_parent, from_children} = Enum.split_while(rest, &(&1.shard_id == parent))
    # The parent is read to its end before any child record is delivered.
    assert length(from_parent) == 100
    assert Enum.all?(from_children, &(&1.shard_id != parent))
    assert from_children |> Enum.map(& &1.shard_id) |> Enum.uniq() |> length() == 2

    datas = Enum.map(consumed_before_split ++ rest, & &1.data) |> Enum.sort()
    assert datas == Enum.sort(for i <- 0..399, do: "record-#{i}")
    refute_receive {:h, _, _}, 500
  end

  @tag :embedded_only
  test "an expired iterator is renewed from the last processed record: nothing lost or repeated" do
    {:ok, local} = Convoy.Local.start(iterator_ttl_seconds: 1)
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("expiry"), 1, endpoint)

    config = [
      stream: stream,
      kinesis: kinesis(endpoint),
      iterator_type: :trim_horizon,
      poll_interval: 100
    ]

    start_supervised!({Convoy.Queue, config ++ [poll_limit: 10]})
    :ok = Convoy.Queue.attach_handler(stream, :pid, self(), nil)

    raw_put!(stream, 30, endpoint: endpoint)

    log =
      capture_log(fn ->
        datas =
          for _ <- 1..3 do
            assert_receive {:convoy_batch, batch}, 10_000
            # Hold the batch past the iterator's lifetime.
            Process.sleep(1_500)
            Convoy.Queue.ack(batch)
            Enum.map(batch.records, & &1.data)
          end

        refute_receive {:convoy_batch, _}, 1_000
        assert List.flatten(datas) == for(i <- 0..29, do: "record-#{i}")
      end)

    # The iterator did expire, and reading went on from the last record.
    assert log =~ "ExpiredIteratorException"
    Convoy.Local.stop(local)
  end
end
