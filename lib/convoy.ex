defmodule Convoy do
  @moduledoc """
  Convoy lets an Elixir application produce to and consume from streaming
  and queue services behind one small API, starting with AWS Kinesis Data
  Streams.

  The work happens in a Rust NIF: a tokio runtime inside the VM hosts the
  Kinesis batcher (producer) and one poller per shard (consumer), and sends
  records to BEAM processes as messages. No NIF call waits on the network.

  Start with `Convoy.Queue`.

  ## Example

      children = [{Convoy.Queue, stream: "events", poll_interval: 1_000}]
      Supervisor.start_link(children, strategy: :one_for_one)

      :ok = Convoy.Queue.put("events", "user-1", %{action: "login"})
      :ok = Convoy.Queue.attach_handler("events", :log, fn record, _ -> IO.inspect(record.data) end, nil)
  """
end
