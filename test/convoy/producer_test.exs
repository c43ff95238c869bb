defmodule Convoy.ProducerTest do
  use ExUnit.Case, async: true

  import Convoy.TestSupport
  import ExUnit.CaptureLog

  defp start_queue!(stream, opts \\ []) do
    opts = Keyword.merge([stream: stream, kinesis: kinesis()], opts)
    start_supervised!({Convoy.Queue, opts}, id: make_ref())
    Keyword.get(opts, :stream_id, stream)
  end

  describe "validation" do
    setup do
      stream = create_stream!(unique_stream("validate"), 1)
      {:ok, id: start_queue!(stream, max_record_bytes: 1024)}
    end

    test "every bad input has its named error", %{id: id} do
      assert Convoy.Queue.put(id, "", "x") ==
               {:error, {:invalid_partition_key, "must not be empty"}}

      assert Convoy.Queue.put(id, String.duplicate("é", 257), "x") ==
               {:error, {:invalid_partition_key, "has 257 characters, at most 256 are allowed"}}

      assert {:ok, _} = Convoy.Queue.put(id, String.duplicate("a", 256), "x", await: 10_000)

      assert Convoy.Queue.put(id, <<0xFF>>, "x") ==
               {:error, {:invalid_partition_key, "must be valid UTF-8"}}

      assert Convoy.Queue.put(id, :atom_key, "x") ==
               {:error, {:invalid_partition_key, "must be a binary"}}

      assert Convoy.Queue.put(id, "k", :binary.copy("a", 1024)) ==
               {:error, {:record_too_large, 1025, 1024}}

      assert Convoy.Queue.put(id, "k", "x",
               explicit_hash_key: "340282366920938463463374607431768211456"
             ) ==
               {:error,
                {:invalid_explicit_hash_key,
                 "340282366920938463463374607431768211456 is greater than 2^128-1"}}

      assert Convoy.Queue.put(id, "k", "x", explicit_hash_key: "-1") ==
               {:error, {:invalid_explicit_hash_key, "\"-1\" is not a decimal integer"}}

      assert Convoy.Queue.put(id, "k", "x", explicit_hash_key: 12) ==
               {:error, {:invalid_explicit_hash_key, "must be a decimal string"}}

      assert Convoy.Queue.put(id, "k", {:a, 1}) ==
               {:error, {:invalid_data, "a tuple has no JSON form"}}

      assert Convoy.Queue.put(id, "k", %{pid: self()}) ==
               {:error, {:invalid_data, "a pid has no JSON form, at [:pid]"}}

      assert Convoy.Queue.put(id, "k", [make_ref()]) ==
               {:error, {:invalid_data, "a reference has no JSON form, at [0]"}}

      assert Convoy.Queue.put(id, "k", fn -> 1 end) ==
               {:error, {:invalid_data, "a function has no JSON form"}}

      assert Convoy.Queue.put(id, "k", "x", bogus: 1) == {:error, {:unknown_options, [:bogus]}}
      assert Convoy.Queue.put(:never_started, "k", "x") == {:error, :unknown_stream}
    end
  end

  test "a stopped queue is unknown again and a restarted one works again" do
    stream = create_stream!(unique_stream("closed"), 1)
    {:ok, pid} = Convoy.Queue.start_link(stream: stream, kinesis: kinesis())
    assert :ok = Convoy.Queue.put(stream, "k", "before")
    Process.unlink(pid)
    Supervisor.stop(pid)
    assert Convoy.Queue.put(stream, "k", "after") == {:error, :unknown_stream}
    assert Convoy.Queue.flush(stream) == {:error, :unknown_stream}
    # What was buffered before the stop was delivered by the shutdown.
    assert ["before"] == Enum.map(read_all(stream), & &1.data)
    {:ok, pid} = Convoy.Queue.start_link(stream: stream, kinesis: kinesis())
    assert {:ok, _} = Convoy.Queue.put(stream, "k", "again", await: 10_000)
    GenServer.stop(pid)
  end

  test "a put a closed producer refuses answers :closed, and no outcome message follows" do
    stream = create_stream!(unique_stream("refused"), 1)
    id = start_queue!(stream)
    [{_owner, {service, handle}}] = Registry.lookup(Convoy.Registry, {:handle, id})
    ref = make_ref()
    :ok = Convoy.Native.producer_close(handle.producer, 1_000, {self(), ref})
    assert_receive {^ref, :ok}, 5_000

    assert service.put(handle, "k", "refused", await: 1_000) == {:error, :closed}
    # Refused before the record is built, or (closed meanwhile) as it is
    # pushed: either way its reply must not reach the mailbox.
    refute_receive _, 300
  end

  test "await returns the shard and sequence number Kinesis assigned" do
    stream = create_stream!(unique_stream("await"), 2)
    id = start_queue!(stream)

    assert {:ok, %{shard_id: shard, sequence_number: seq}} =
             Convoy.Queue.put(id, "k", "v", await: 10_000)

    assert [%{shard_id: ^shard, sequence_number: ^seq, data: "v"}] = read_all(stream)
  end

  test "non-binary data is encoded as JSON" do
    stream = create_stream!(unique_stream("json"), 1)
    id = start_queue!(stream, batch_timeout: 0)

    data = %{
      "name" => "sensor",
      "values" => [1, 2.5, nil, true],
      "nested" => %{"ok" => false},
      atom: :value
    }

    assert {:ok, _} = Convoy.Queue.put(id, "k", data, await: 10_000)
    assert {:ok, _} = Convoy.Queue.put(id, "k", [1, "two", 3], await: 10_000)
    assert {:ok, _} = Convoy.Queue.put(id, "k", 42, await: 10_000)
    [map, list, number] = Enum.map(read_all(stream), & &1.data)

    assert :json_decoded ==
             (fn ->
                assert map =~ ~s("name":"sensor")
                assert map =~ ~s("values":[1,2.5,null,true])
                assert map =~ ~s("nested":{"ok":false})
                assert map =~ ~s("atom":"value")
                :json_decoded
              end).()

    assert list == ~s([1,"two",3])
    assert number == "42"
  end

  describe "batching" do
    for timeout <- [0, 200, 5_000] do
      test "batch_timeout #{timeout}: records arrive, in order, and flush sends at once" do
        stream = create_stream!(unique_stream("batch"), 1)
        id = start_queue!(stream, batch_timeout: unquote(timeout))
        for i <- 1..50, do: :ok = Convoy.Queue.put(id, "k", "r#{i}")
        # With the default 5 s timeout nothing would have gone yet: flush forces it.
        assert :ok = Convoy.Queue.flush(id, await: 10_000)
        assert Enum.map(read_all(stream), & &1.data) == Enum.map(1..50, &"r#{&1}")
        assert %{sent: 50, buffered: 0, in_flight: 0, failed: 0} = Convoy.Queue.stats(id)
      end
    end

    test "a small batch_timeout sends without a flush" do
      stream = create_stream!(unique_stream("timer"), 1)
      id = start_queue!(stream, batch_timeout: 100)
      for i <- 1..10, do: :ok = Convoy.Queue.put(id, "k", "r#{i}")
      eventually(fn -> Convoy.Queue.stats(id).sent == 10 end, 10_000)
    end
  end

  test "backpressure: a full buffer answers :overloaded at once and loses nothing" do
    stream = create_stream!(unique_stream("overload"), 1)
    id = start_queue!(stream, batch_timeout: 60_000, max_buffered_records: 100)
    results = for i <- 1..150, do: Convoy.Queue.put(id, "k", "r#{i}")
    assert Enum.count(results, &(&1 == :ok)) == 100
    assert Enum.count(results, &(&1 == {:error, :overloaded})) == 50
    assert :ok = Convoy.Queue.flush(id, await: 10_000)
    assert length(read_all(stream)) == 100
  end

  @tag timeout: 600_000
  test "100,000 records (at full volume) from 50 processes arrive exactly once, byte-exact, in per-key order" do
    stream = create_stream!(unique_stream("bulk"), 4)
    id = start_queue!(stream, batch_timeout: 100)
    per_process = volume(2_000)

    1..50
    |> Task.async_stream(
      fn p ->
        for i <- 1..per_process do
          data = "p#{p}-#{i}-" <> :binary.copy(<<rem(i, 256)>>, rem(i, 64))
          put_until_accepted(id, "key-#{rem(p, 10)}", data)
        end
      end,
      max_concurrency: 50,
      timeout: :infinity
    )
    |> Stream.run()

    assert :ok = Convoy.Queue.flush(id, await: 120_000)
    records = read_all(stream)
    assert length(records) == 50 * per_process
    datas = Enum.map(records, & &1.data)
    assert length(Enum.uniq(datas)) == 50 * per_process

    expected =
      for p <- 1..50,
          i <- 1..per_process,
          into: MapSet.new(),
          do: "p#{p}-#{i}-" <> :binary.copy(<<rem(i, 256)>>, rem(i, 64))

    assert MapSet.new(datas) == expected

    # Per partition key, each producer's records keep their order.
    for {_key, group} <- Enum.group_by(records, & &1.partition_key) do
      group
      |> Enum.map(fn %{data: d} ->
        [p, i | _] = String.split(d, "-", parts: 3)
        {p, String.to_integer(i)}
      end)
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))
      |> Enum.each(fn {_p, seq} -> assert seq == Enum.sort(seq) end)
    end
  end

  test "graceful shutdown delivers a full buffer" do
    stream = create_stream!(unique_stream("shutdown"), 2)

    {:ok, sup} =
      Supervisor.start_link(
        [{Convoy.Queue, stream: stream, kinesis: kinesis(), batch_timeout: 600_000}],
        strategy: :one_for_one
      )

    # Many keys: in per-key order a request carries each key once, and the
    # slowest emulator takes tens of milliseconds per request.
    for i <- 1..5_000, do: :ok = Convoy.Queue.put(stream, "k#{rem(i, 1_000)}", "r#{i}")
    # Full requests go at once; the rest of each lane waits for its timeout.
    assert %{buffered: buffered} = Convoy.Queue.stats(stream)
    assert buffered > 0
    Supervisor.stop(sup)
    assert length(read_all(stream)) == 5_000
  end

  # Kinesis does not answer: at the shutdown deadline the request in flight
  # ends, and everything still buffered fails at once, so every failure
  # reaches on_failure before the queue is gone. (The request in flight used
  # to run to its timeout and its retries to the retry deadline, and a
  # backlog of one key then failed one record per cut.)
  @tag timeout: 120_000
  test "a backlog of one key fails at once at the shutdown deadline, every record reported" do
    me = self()
    stream = unique_stream("overdue")
    count = 100_000
    # An endpoint that takes connections and never answers: every attempt
    # times out and is retried until the deadline.
    {:ok, silent} = :gen_tcp.listen(0, ip: {127, 0, 0, 1}, active: false)
    {:ok, port} = :inet.port(silent)

    {:ok, queue} =
      Convoy.Queue.start_link(
        stream: stream,
        kinesis:
          Keyword.put(
            Convoy.Local.kinesis_options("http://127.0.0.1:#{port}"),
            :request_timeout,
            100
          ),
        batch_timeout: 0,
        max_retries: 1_000,
        retry_deadline: 600_000,
        shutdown: 1_000,
        on_failure: me
      )

    for i <- 1..count, do: :ok = put_until_accepted(stream, "k", "r#{i}")

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        Process.unlink(queue)
        :ok = Supervisor.stop(queue, :normal, 60_000)
      end)

    refute log =~ "did not close in time"

    reported =
      Stream.repeatedly(fn ->
        receive do
          {:convoy_put_failed, _, failures} -> length(failures)
        after
          0 -> nil
        end
      end)
      |> Enum.take_while(& &1)
      |> Enum.sum()

    assert reported == count
    :gen_tcp.close(silent)
  end

  test "records that finally fail are logged, counted and handed to on_failure" do
    me = self()
    stream = unique_stream("missing")
    Convoy.TestTelemetry.subscribe()
    # The stream never exists: every attempt fails until the retries run out.
    log =
      capture_log(fn ->
        id =
          start_queue!(stream,
            stream_id: {:missing, stream},
            batch_timeout: 0,
            max_retries: 2,
            retry_backoff: 10,
            on_failure: fn failure -> send(me, {:failed, failure}) end
          )

        assert {:error, {:aws, "ResourceNotFoundException", _}} =
                 Convoy.Queue.put(id, "k", "lost?", await: 10_000)

        assert_receive {:failed,
                        %{
                          partition_key: "k",
                          data: "lost?",
                          reason: {:aws, "ResourceNotFoundException", _}
                        }},
                       5_000

        assert %{failed: 1, retried: 2, sent: 0} = Convoy.Queue.stats(id)

        assert_receive {:telemetry_event, [:convoy, :put, :failed], %{count: 1},
                        %{stream_id: ^id} = metadata}

        assert %{stream: ^stream, reason: {:aws, "ResourceNotFoundException", _}} = metadata
        refute_receive {:telemetry_event, [:convoy, :put, :failed], _, %{stream_id: ^id}}, 200
      end)

    assert log =~ "1 record(s) failed after retries"
  end
end
