defmodule Convoy.RequestCutsTest do
  # The producer cuts PutRecords requests at 500 records and at 5 MiB, and
  # not before: the entries of each request are counted by the emulator.
  use ExUnit.Case, async: true

  import Convoy.TestSupport

  @moduletag :embedded_only

  setup do
    {:ok, local} = Convoy.Local.start(log_put_records: true)
    on_exit(fn -> Convoy.Local.stop(local) end)
    endpoint = Convoy.Local.endpoint(local)
    stream = create_stream!(unique_stream("cuts"), 1, endpoint)

    %{local: local, stream: stream, endpoint: endpoint}
  end

  # One lane cuts every request; nothing leaves before the flush but full
  # requests.
  defp start_queue(%{stream: stream, endpoint: endpoint}, options \\ []) do
    start_supervised!(
      {Convoy.Queue,
       [stream: stream, kinesis: kinesis(endpoint), batch_timeout: 60_000, max_in_flight: 1] ++
         options}
    )
  end

  test "1,200 small records go in requests of 500, 500 and 200",
       %{local: local, stream: stream} = context do
    start_queue(context)
    for i <- 1..1_200, do: :ok = put_until_accepted(stream, "k#{i}", "r#{i}")
    :ok = Convoy.Queue.flush(stream, await: 30_000)
    assert Enum.map(logged_requests(local, 1_200), &elem(&1, 0)) == [500, 500, 200]
  end

  test "12 records of 1,000,000 bytes go in requests of 5, 5 and 2 (5 MiB each at most)",
       %{local: local, stream: stream} = context do
    start_queue(context)
    data = :binary.copy("x", 1_000_000)
    for i <- 1..12, do: :ok = put_until_accepted(stream, "k#{i}", data)
    :ok = Convoy.Queue.flush(stream, await: 60_000)
    requests = logged_requests(local, 12)
    assert Enum.map(requests, &elem(&1, 0)) == [5, 5, 2]
    assert Enum.all?(requests, fn {_, bytes} -> bytes <= 5 * 1024 * 1024 end)
  end

  # In per-key order (the default) a request carries each key once: the
  # second and third records of "a" and "b" wait for the next requests,
  # while "c" joins the first.
  test "per-key order: records of one key go in successive requests", context do
    start_queue(context)
    put_abc(context.stream)
    assert entries(context.local, 7) == [3, 2, 2]
  end

  test "relaxed order: one request takes them all", context do
    start_queue(context, ordering: :relaxed)
    put_abc(context.stream)
    assert entries(context.local, 7) == [7]
  end

  # Aggregated records of at most 1 KiB hold two of these 400-byte records:
  # "a" fills the first, and its third record would need a second
  # aggregated record of its own, so it waits; "b" fills the second (its
  # third waits too) and "c" starts a third. The next request carries the
  # two that waited, in one aggregated record. (In relaxed order the third
  # "a" would have started the second aggregated record.)
  test "per-key order with aggregation: a key's records share one aggregated record",
       %{local: local, stream: stream} = context do
    start_queue(context, aggregation: true, aggregation_max_bytes: 1_024)
    for key <- ["a", "b"], i <- 1..3, do: :ok = Convoy.Queue.put(stream, key, pad(i))
    :ok = Convoy.Queue.put(stream, "c", pad(1))
    :ok = Convoy.Queue.flush(stream, await: 30_000)
    assert entries(local, 4) == [3, 1]
  end

  test "relaxed order with aggregation: the third \"a\" starts the second aggregated record",
       %{local: local, stream: stream} = context do
    start_queue(context, aggregation: true, aggregation_max_bytes: 1_024, ordering: :relaxed)
    for key <- ["a", "b"], i <- 1..3, do: :ok = Convoy.Queue.put(stream, key, pad(i))
    :ok = Convoy.Queue.put(stream, "c", pad(1))
    :ok = Convoy.Queue.flush(stream, await: 30_000)
    assert entries(local, 4) == [4]
  end

  defp put_abc(stream) do
    for i <- 1..3, key <- ["a", "b"], do: :ok = Convoy.Queue.put(stream, key, "#{key}#{i}")
    :ok = Convoy.Queue.put(stream, "c", "c1")
    :ok = Convoy.Queue.flush(stream, await: 30_000)
  end

  defp pad(i), do: String.pad_trailing("#{i}", 400, ".")

  defp entries(local, records) do
    local |> logged_requests(records) |> Enum.map(&elem(&1, 0))
  end

  # The emulator logs each request on its standard output, which reaches
  # Convoy.Local as port messages: the last line may still be on its way
  # when the flush is answered. Waits until `count` records are logged.
  defp logged_requests(local, count, tries \\ 50) do
    requests = Convoy.Local.put_requests(local)
    logged = requests |> Enum.map(&elem(&1, 0)) |> Enum.sum()

    if logged < count and tries > 0 do
      Process.sleep(100)
      logged_requests(local, count, tries - 1)
    else
      requests
    end
  end
end
