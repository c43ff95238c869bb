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

    # One key, so one lane cuts every request; nothing leaves before the flush
    # but full requests.
    start_supervised!(
      {Convoy.Queue, stream: stream, kinesis: kinesis(endpoint), batch_timeout: 60_000}
    )

    %{local: local, stream: stream}
  end

  test "1,200 small records go in requests of 500, 500 and 200", %{local: local, stream: stream} do
    for i <- 1..1_200, do: :ok = put_until_accepted(stream, "k", "r#{i}")
    :ok = Convoy.Queue.flush(stream, await: 30_000)
    assert Enum.map(logged_requests(local, 1_200), &elem(&1, 0)) == [500, 500, 200]
  end

  test "12 records of 1,000,000 bytes go in requests of 5, 5 and 2 (5 MiB each at most)",
       %{local: local, stream: stream} do
    data = :binary.copy("x", 1_000_000)
    for _ <- 1..12, do: :ok = put_until_accepted(stream, "k", data)
    :ok = Convoy.Queue.flush(stream, await: 60_000)
    requests = logged_requests(local, 12)
    assert Enum.map(requests, &elem(&1, 0)) == [5, 5, 2]
    assert Enum.all?(requests, fn {_, bytes} -> bytes <= 5 * 1024 * 1024 end)
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
