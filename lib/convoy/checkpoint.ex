defmodule Convoy.Checkpoint do
  @moduledoc """
  Where a queue stores how far each shard has been consumed.

  Once every handler has processed a batch, the shard's dispatcher stores the
  batch's last sequence number; a shard read to its end stores `:shard_end`.
  On start a shard resumes right after its checkpoint.

  Implementations must accept calls from several processes at once (one per
  shard). Two ship with Convoy: `Convoy.Checkpoint.Memory` (the default, kept
  as long as the `:convoy` application runs, so across restarts of the queue)
  and `Convoy.Checkpoint.File` (durable).

  Checkpoints are keyed by `stream_id` (an atom and the string of the same
  name share them, as they name the same queue). A `:shard_end` is trusted only for a
  shard whose children are listed, so the open shards of a stream deleted
  and created again under the same name start from `:iterator_type` instead
  of being skipped; a stale sequence number there falls back to the shard's
  start.

  ## Example

      {Convoy.Queue,
       stream: "events",
       poll_interval: 1_000,
       checkpoint: {Convoy.Checkpoint.File, dir: "/var/lib/my_app/checkpoints"}}
  """

  @typedoc """
  A sequence number (that Kinesis record was processed), `{sequence_number,
  sub_sequence_number}` (the user records of that aggregated record were
  processed up to and including that sub-sequence number: the KCL's
  extended sequence number), `:shard_end` for a shard read to its end, or
  `{:at_timestamp, unix_ms}`: the first position of a shard read from
  `:latest`, stored before any record of it was processed, so that a
  restarted queue resumes at the time the first one started instead of
  at its own start (which would skip what arrived in between).

  A batch ending with a user record of an aggregated record is stored as
  `{sequence_number, sub_sequence_number}`; a shard resumes from one at
  that Kinesis record, without the user records up to the sub-sequence
  number.
  """
  @type position ::
          String.t()
          | {String.t(), non_neg_integer}
          | :shard_end
          | {:at_timestamp, integer}

  @doc false
  # A shard resumed from `{sequence_number, sub}` reads that aggregated
  # record again: its user records up to `sub` were processed already.
  @spec drop_processed([Convoy.Record.t()], {String.t(), non_neg_integer}) :: [Convoy.Record.t()]
  def drop_processed(records, {sequence, sub}) do
    Enum.reject(
      records,
      &(&1.sequence_number == sequence and (&1.sub_sequence_number || 0) <= sub)
    )
  end

  @doc "Prepares the store; `options` include `:stream_id` and the queue's checkpoint options."
  @callback init(options :: keyword) :: {:ok, state :: term}

  @doc "The checkpoint of a shard, or `:error` when it has none."
  @callback fetch(state :: term, stream_id :: term, shard_id :: String.t()) ::
              {:ok, position} | :error

  @doc "Stores the checkpoint of a shard."
  @callback store(state :: term, stream_id :: term, shard_id :: String.t(), position) :: :ok
end
