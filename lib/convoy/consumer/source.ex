defmodule Convoy.Consumer.Source do
  @moduledoc """
  What `Convoy.Consumer` needs from a service to read a stream: its shards,
  a reader per shard, and pull reads. The consumer does the rest (handlers,
  dispatch, acknowledgements, checkpoints, resharding order), the same way
  for every service.

  ## The reader protocol

  A reader started with `c:start_reader/5` sends its dispatcher process:

    * `{:convoy_records, shard_id, records, millis_behind_latest}` - a batch
      of `%Convoy.Record{}` structs, complete (with `shard_id` and the
      queue's `stream_id`). The reader sends nothing more until `c:ack/1`
      is called for it.
    * `{:convoy_records_ready, shard_id, count, millis_behind_latest}` - the
      same, for a reader that implements `c:take/1`: a batch read as `count`
      records (of the service's own, before any unpacking: aggregated Kinesis
      records expand into more) waits in the reader, and the dispatcher takes
      it in chunks from its own process (`c:take/1`), so the records are
      built on its heap rather than sent. Such a reader reports unparseable
      records through `c:take/1` instead of the `:convoy_unparseable`
      message.
    * `{:convoy_shard_end, shard_id}` - a closed shard was read to its end;
      the consumer lists the shards to find its children.
    * `{:convoy_shard_end, shard_id, children}` - the same, with the shards
      that continue it as Kinesis named them at the end (a SubscribeToShard
      event's ChildShards), each a map as `c:list_shards/1` gives a shard
      (`:shard_id`, `:parent_shard_id`, `:adjacent_parent_shard_id`, and
      `:starting_hash_key` / `:ending_hash_key` as decimal strings). They
      start without a listing, once every parent they name is finished.
    * `{:convoy_poller_error, shard_id, reason}` - an error worth logging;
      the reader retries transient ones itself.
    * `{:convoy_poller_stopped, shard_id, reason}` - the reader gave up on
      an error retrying cannot cure; the consumer restarts the shard from
      its checkpoint after a pause.
    * `{:convoy_unparseable, shard_id, [{sequence_number, reason}]}` -
      records of the last batch that could not be unpacked as they looked
      (`reason` is `:empty_aggregate`, `:bad_checksum` or
      `:malformed_aggregate`); they are logged and counted, and the batch
      goes on (see `report_unparseable/4`).

  Sequence numbers are decimal strings that grow within a shard.

  ## Example

      defmodule MyApp.NullSource do
        @behaviour Convoy.Consumer.Source
        def list_shards(_), do: {:ok, []}
        def start_reader(_, _, _, _, _), do: nil
        def ack(_), do: :ok
        def stop_reader(_), do: :ok
        def read(_, _, position, _), do: {:ok, [], position, 0}
      end
  """

  @typedoc "A shard as `list_shards/1` describes it."
  @type shard :: %{
          required(:shard_id) => String.t(),
          required(:parent_shard_id) => String.t() | nil,
          required(:adjacent_parent_shard_id) => String.t() | nil,
          optional(atom) => term
        }

  @typedoc "Where reading starts."
  @type position ::
          :latest
          | :trim_horizon
          | {:at_sequence_number, String.t()}
          | {:after_sequence_number, String.t()}
          | {:at_timestamp, integer}

  @doc "Every shard of the stream, closed ones included."
  @callback list_shards(source :: term) :: {:ok, [shard]} | {:error, term}

  @doc """
  Starts reading `shard_id` at `position`, sending batches to `dispatcher`.
  `options` has `:poll_interval`, `:poll_limit`, `:retry_backoff` and `:max_backoff`.
  """
  @callback start_reader(
              source :: term,
              shard_id :: String.t(),
              position,
              dispatcher :: pid,
              options :: map
            ) ::
              reader :: term

  @doc """
  The next chunk of the batch a `:convoy_records_ready` message announced,
  taken by the dispatcher process: its `%Convoy.Record{}` structs
  (aggregated records expanded, so a batch may give more or fewer than the
  message's `count`) and the records of it that could not be unpacked, as
  in the `:convoy_unparseable` message; `:done` once all of it was taken.
  The dispatcher hands each chunk to the handlers as a batch and takes the
  next one until `:done`, which it must get (a chunk that leaves nothing
  does not end the batch); then it stores the checkpoint and calls `c:ack/1`.
  Only readers that send `:convoy_records_ready` implement it; the reader
  decides how large a chunk is and where the work runs (the Kinesis reader
  gives chunks of at most 500 Kinesis records and 1 MiB, and builds one with
  aggregated records on a dirty scheduler).
  """
  @callback take(reader :: term) ::
              {[Convoy.Record.t()], [{String.t(), atom}]} | :done

  @doc "The dispatcher finished the reader's last batch."
  @callback ack(reader :: term) :: :ok

  @doc "Stops a reader."
  @callback stop_reader(reader :: term) :: :ok

  @doc """
  One read of a shard for pull reads (`Convoy.Queue.get/2`): up to about
  `limit` records (user records of an aggregated record may make more) from
  `cursor`, which is a `t:position/0` or a cursor an earlier read returned.
  Answers the records, the cursor to read on from (`nil` when a closed
  shard was read to its end) and how far behind the shard's tip the read
  ended, in ms (`0` when caught up, `-1` when unknown).

  The consumer follows the returned cursors across empty answers, spaces
  the reads of a shard by 200 ms and answers a cursor that failed again
  from the position after the last record it received.
  """
  @callback read(source :: term, shard_id :: String.t(), cursor :: term, limit :: pos_integer) ::
              {:ok, [Convoy.Record.t()], next :: term | nil, millis_behind :: integer}
              | {:error, term}

  @optional_callbacks take: 1

  require Logger

  @doc """
  Logs and counts records a reader could not unpack: emits
  `[:convoy, :record, :unparseable]` with `%{count: n}` and `%{stream:,
  stream_id:, shard_id:, records: [{sequence_number, reason}]}`. Readers'
  dispatchers and pull reads call it.

  ## Example

      Convoy.Consumer.Source.report_unparseable("events", "events", "shardId-000000000000", [{"4959...", :bad_checksum}])
  """
  @spec report_unparseable(term, term, String.t(), [{String.t(), atom}]) :: :ok
  def report_unparseable(_stream, _stream_id, _shard_id, []), do: :ok

  def report_unparseable(stream, stream_id, shard_id, records) do
    Logger.warning(
      "Convoy #{inspect(stream_id)}: #{length(records)} record(s) of #{shard_id} could not be " <>
        "unpacked: #{inspect(records)}; an empty aggregated record delivers nothing, a corrupt " <>
        "one is delivered as a plain record"
    )

    Convoy.Telemetry.execute(
      [:convoy, :record, :unparseable],
      %{count: length(records)},
      %{stream: stream, stream_id: stream_id, shard_id: shard_id, records: records}
    )
  end
end
