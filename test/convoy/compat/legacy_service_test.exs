defmodule Convoy.Compat.LegacyServiceTest do
  # A service written for Convoy 0.1's `Convoy.Service` behaviour, as an
  # application had it: four callbacks answering in ExAws' shapes. This one
  # keeps its stream in an Agent named after the stream.
  use ExUnit.Case, async: true

  import ExUnit.CaptureLog
  import Convoy.TestSupport, only: [eventually: 1]

  defmodule OldService do
    @behaviour Convoy.Service

    def start(stream, shards \\ 1) do
      Agent.start(
        fn ->
          %{shards: Map.new(1..shards, &{shard(&1), []}), fail: 0, fail_first: 0, sizes: []}
        end,
        name: name(stream)
      )
    end

    def fail_next(stream, n), do: Agent.update(name(stream), &%{&1 | fail: n})

    # The next call stores all but its first record, which Kinesis refuses.
    def fail_first_of_next(stream), do: Agent.update(name(stream), &%{&1 | fail_first: 1})

    # Bytes (keys and data) of each put_records call, in order.
    def sizes(stream), do: Agent.get(name(stream), &Enum.reverse(&1.sizes))

    defp shard(i), do: "shardId-#{String.pad_leading("#{i}", 12, "0")}"
    defp name(stream), do: :"old_service_#{stream}"

    @impl true
    def describe_stream(stream) do
      shards = Agent.get(name(stream), &Map.keys(&1.shards))

      {:ok,
       %{
         "StreamDescription" => %{
           "Shards" => Enum.map(shards, &%{"ShardId" => &1}),
           "StreamName" => "#{stream}"
         }
       }}
    end

    # Iterators are "stream|shard|index"; this service knows only the two
    # atoms, as ExAws' callers passed them.
    @impl true
    def get_iterator(stream, shard_id, :trim_horizon),
      do: %{"ShardIterator" => "#{stream}|#{shard_id}|0"}

    def get_iterator(stream, shard_id, :latest) do
      count = Agent.get(name(stream), &length(&1.shards[shard_id]))
      %{"ShardIterator" => "#{stream}|#{shard_id}|#{count}"}
    end

    @impl true
    def get_records(iterator, limit: limit) do
      [stream, shard_id, index] = String.split(iterator, "|")
      index = String.to_integer(index)

      records =
        Agent.get(name(stream), &(&1.shards[shard_id] |> Enum.drop(index) |> Enum.take(limit)))

      raw =
        records
        |> Enum.with_index(index + 1)
        |> Enum.map(fn {%{data: data, partition_key: key}, seq} ->
          %{"Data" => data, "PartitionKey" => key, "SequenceNumber" => "#{seq}"}
        end)

      {raw, "#{stream}|#{shard_id}|#{index + length(records)}"}
    end

    @impl true
    def put_records(stream, records) do
      size = Enum.sum(for r <- records, do: byte_size(r.partition_key) + byte_size(r.data))

      Agent.get_and_update(name(stream), fn
        %{fail: n} = state when n > 0 ->
          {{:error, {:http_error, 500, "boom"}}, %{state | fail: n - 1}}

        %{fail_first: 1} = state ->
          [{shard, existing}] = Enum.take(state.shards, 1)
          [_refused | stored] = records

          results =
            [%{"ErrorCode" => "InternalFailure", "ErrorMessage" => "refused"}] ++
              for i <- 1..length(stored)//1,
                  do: %{"ShardId" => shard, "SequenceNumber" => "#{length(existing) + i}"}

          state = %{state | fail_first: 0, sizes: [size | state.sizes]}

          {{:ok, %{"FailedRecordCount" => 1, "Records" => results}},
           put_in(state.shards[shard], existing ++ stored)}

        state ->
          [{shard, existing}] = Enum.take(state.shards, 1)
          state = %{state | sizes: [size | state.sizes]}
          {{:ok, %{"FailedRecordCount" => 0}}, put_in(state.shards[shard], existing ++ records)}
      end)
    end
  end

  defp forward(tag) do
    me = self()
    fn record, config -> send(me, {tag, config, record}) end
  end

  # A queue on the old service that reads from the stream's start.
  defp start_reading!(stream, options) do
    defaults = [
      stream: stream,
      service: OldService,
      poll_interval: 20,
      iterator_type: :trim_horizon
    ]

    start_supervised!({Convoy.Queue, defaults ++ options})
  end

  setup do
    stream = String.to_atom("legacy-#{System.unique_integer([:positive])}")
    {:ok, agent} = OldService.start(stream)
    on_exit(fn -> Process.exit(agent, :kill) end)
    %{stream: stream}
  end

  test "it carries records from put to handlers, in order", %{stream: stream} do
    start_reading!(stream, batch_timeout: 50)

    :ok = Convoy.Queue.attach_handler(stream, :h, forward(:got), :cfg)
    for i <- 1..20, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 3)}", "r#{i}")
    :ok = Convoy.Queue.put(stream, "k", %{at: ~D[2024-01-02]})

    for i <- 1..20 do
      expected = "r#{i}"

      assert_receive {:got, :cfg,
                      %Convoy.Record{data: ^expected, shard_id: "shardId-000000000001"}},
                     5_000
    end

    assert_receive {:got, :cfg,
                    %Convoy.Record{data: ~s({"at":"2024-01-02"}), sequence_number: "21"}},
                   5_000

    refute_receive {:got, _, _}, 300
    assert %{sent: 21, failed: 0} = Convoy.Queue.stats(stream)
  end

  test "get/2 pulls, awaited puts answer once put_records returned", %{stream: stream} do
    start_supervised!(
      {Convoy.Queue,
       stream: stream, service: OldService, iterator_type: :trim_horizon, batch_timeout: 20}
    )

    assert {:ok, %{}} = Convoy.Queue.put(stream, "k", "a", await: 10_000)
    :ok = Convoy.Queue.put(stream, "k", "b")
    :ok = Convoy.Queue.flush(stream)
    assert [%Convoy.Record{data: "a"}] = Convoy.Queue.get(stream, 1)
    assert [%Convoy.Record{data: "b"}] = Convoy.Queue.get(stream)
    assert [] = Convoy.Queue.get(stream)
  end

  test "a failed put_records takes the failure path", %{stream: stream} do
    me = self()
    # An id other than the stream's name: the failure event carries both.
    id = {:old, stream}
    Convoy.TestTelemetry.subscribe()

    start_supervised!(
      {Convoy.Queue,
       stream: stream,
       stream_id: id,
       service: OldService,
       batch_timeout: 20,
       on_failure: fn f -> send(me, {:failed, f}) end}
    )

    OldService.fail_next(stream, 1)

    log =
      capture_log(fn ->
        assert Convoy.Queue.put(id, "k", "lost", await: 10_000) ==
                 {:error, {:http_error, 500, "boom"}}
      end)

    assert log =~ "failed"

    assert_receive {:failed,
                    %{data: "lost", partition_key: "k", reason: {:http_error, 500, "boom"}}}

    # The stream's name is a string in telemetry, also when given as an atom.
    name = Atom.to_string(stream)

    assert_receive {:telemetry_event, [:convoy, :put, :failed], %{count: 1},
                    %{stream: ^name, stream_id: ^id, reason: {:http_error, 500, "boom"}}}

    assert {:ok, _} = Convoy.Queue.put(id, "k", "kept", await: 10_000)
    assert %{sent: 1, failed: 1} = Convoy.Queue.stats(id)
    refute_received {:telemetry_event, [:convoy, :put, :failed], _, %{stream_id: ^id}}
  end

  test "awaiting callers of one batch each hear their own record's outcome", %{stream: stream} do
    start_supervised!({Convoy.Queue, stream: stream, service: OldService, batch_timeout: 60_000})

    OldService.fail_first_of_next(stream)
    first = Task.async(fn -> Convoy.Queue.put(stream, "k", "refused", await: 10_000) end)
    eventually(fn -> Convoy.Queue.stats(stream).buffered == 1 end)
    second = Task.async(fn -> Convoy.Queue.put(stream, "k", "stored", await: 10_000) end)
    eventually(fn -> Convoy.Queue.stats(stream).buffered == 2 end)
    :ok = Convoy.Queue.flush(stream)

    capture_log(fn ->
      assert Task.await(first) == {:error, {:aws, "InternalFailure", "refused"}}

      assert Task.await(second) ==
               {:ok, %{shard_id: "shardId-000000000001", sequence_number: "1"}}
    end)
  end

  test "a batch is cut at 5 MiB of keys and data, as PutRecords allows", %{stream: stream} do
    start_supervised!({Convoy.Queue, stream: stream, service: OldService, batch_timeout: 60_000})

    data = :binary.copy("x", 1_000_000)
    for i <- 1..7, do: :ok = Convoy.Queue.put(stream, "k#{i}", data)
    :ok = Convoy.Queue.flush(stream, await: 10_000)

    sizes = OldService.sizes(stream)
    assert Enum.sum(sizes) == 7 * 1_000_002
    assert Enum.all?(sizes, &(&1 <= 5 * 1024 * 1024)), inspect(sizes)
  end

  test "put checks records with the one check every service uses", %{stream: stream} do
    start_supervised!({Convoy.Queue, stream: stream, service: OldService, batch_timeout: 0})

    # "5\n" once passed a `~r/^...$/` check and then raised in String.to_integer.
    assert {:error, {:invalid_explicit_hash_key, _}} =
             Convoy.Queue.put(stream, "k", "v", explicit_hash_key: "5\n")

    # 200 graphemes but 400 code points: Kinesis counts code points.
    long_key = String.duplicate("e\u0301", 200)
    assert {:error, {:invalid_partition_key, _}} = Convoy.Queue.put(stream, long_key, "v")

    for {key, opts} <- [{"k", explicit_hash_key: "5\n"}, {long_key, []}] do
      assert Convoy.Queue.put(stream, key, %{a: 1}, opts) ==
               Convoy.Native.put_record_check(key, %{a: 1}, opts[:explicit_hash_key], 1_048_576)
    end

    assert {:ok, %{}} = Convoy.Queue.put(stream, "k", "v", explicit_hash_key: "5", await: 5_000)
  end

  test "millis_behind_latest is nil in telemetry: an old service does not know it",
       %{stream: stream} do
    Convoy.TestTelemetry.subscribe()
    name = Atom.to_string(stream)

    start_reading!(stream, batch_timeout: 0)

    :ok = Convoy.Queue.attach(stream, :h, forward(:got), nil)
    :ok = Convoy.Queue.put(stream, "k", "v")
    assert_receive {:got, nil, %{data: "v"}}, 5_000

    assert_receive {:telemetry_event, [:convoy, :batch, :stop], %{millis_behind_latest: lag},
                    %{stream_id: ^name}},
                   5_000

    assert lag == nil

    assert_receive {:telemetry_event, [:convoy, :get_records, :stop],
                    %{millis_behind_latest: nil}, %{stream: ^name}},
                   5_000
  end

  test "a queue restarted resumes after its checkpoint even though the service knows only the atoms",
       %{stream: stream} do
    options = [
      stream: stream,
      service: OldService,
      poll_interval: 20,
      iterator_type: :trim_horizon,
      batch_timeout: 0
    ]

    start_supervised!({Convoy.Queue, options}, id: :first)
    :ok = Convoy.Queue.attach(stream, :h, forward(:got), nil)
    for i <- 1..3, do: :ok = Convoy.Queue.put(stream, "k", "#{i}")
    for i <- 1..3, do: assert_receive({:got, nil, %{data: data}}, 5_000) && assert(data == "#{i}")
    stop_supervised!(:first)

    start_supervised!({Convoy.Queue, options}, id: :second)
    :ok = Convoy.Queue.put(stream, "k", "4")
    :ok = Convoy.Queue.attach(stream, :h, forward(:got), nil)
    assert_receive {:got, nil, %{data: "4"}}, 5_000
    refute_receive {:got, _, _}, 300
  end

  test "an old service compiles against Convoy.Service without a warning and is recognised" do
    code = """
    defmodule Convoy.Compat.LegacyServiceTest.Compiled do
      @behaviour Convoy.Service
      @impl true
      def describe_stream(_stream), do: %{"StreamDescription" => %{"Shards" => []}}
      @impl true
      def get_iterator(_stream, _shard_id, _type), do: "it"
      @impl true
      def get_records(_iterator, _opts), do: {[], nil}
      @impl true
      def put_records(_stream, _records), do: :ok
    end
    """

    warnings = ExUnit.CaptureIO.capture_io(:stderr, fn -> Code.compile_string(code) end)
    assert warnings == ""
    assert Convoy.Services.Legacy.legacy?(Convoy.Compat.LegacyServiceTest.Compiled)
    refute Convoy.Services.Legacy.legacy?(Convoy.Services.Memory)

    assert_raise ArgumentError, ~r/service/, fn ->
      Convoy.Queue.child_spec(stream: "s", service: String)
    end
  end
end
