defmodule Convoy.Batch do
  @moduledoc """
  A batch of records of one shard, as a pid handler receives it:

      {:convoy_batch, %Convoy.Batch{}}

  Answer with `Convoy.Queue.ack/1` once the batch is processed; the shard's
  next batch comes only then (the next chunk of the same read, or a new
  read once the last chunk is finished).

  ## Example

      def handle_info({:convoy_batch, batch}, state) do
        Enum.each(batch.records, &store/1)
        Convoy.Queue.ack(batch)
        {:noreply, state}
      end
  """

  @enforce_keys [:stream_id, :shard_id, :handler_id, :records, :ref, :dispatcher]
  defstruct [:stream_id, :shard_id, :handler_id, :records, :ref, :dispatcher]

  @type t :: %__MODULE__{
          stream_id: term,
          shard_id: String.t(),
          handler_id: term,
          records: [Convoy.Record.t()],
          ref: reference,
          dispatcher: pid
        }
end
