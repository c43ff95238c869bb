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
    * `{:convoy_shard_end, shard_id}` - a closed shard was read to its end.
    * `{:convoy_poller_error, shard_id, reason}` - an error worth logging;
      the reader retries transient ones itself.
    * `{:convoy_poller_stopped, shard_id, reason}` - the reader gave up on
      an error retrying cannot cure; the consumer restarts the shard from
      its checkpoint after a pause.

  Sequence numbers are decimal strings that grow within a shard.

  ## Example

      defmodule MyApp.NullSource do
        @behaviour Convoy.Consumer.Source
        def list_shards(_), do: {:ok, []}
        def start_reader(_, _, _, _, _), do: nil
        def ack(_), do: :ok
        def stop_reader(_), do: :ok
        def fetch(_, _, _), do: {:ok, []}
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

  @doc "The dispatcher finished the reader's last batch."
  @callback ack(reader :: term) :: :ok

  @doc "Stops a reader."
  @callback stop_reader(reader :: term) :: :ok

  @doc "Reads up to `limit` records in total from the shards, in order, each from its position."
  @callback fetch(source :: term, [{String.t(), position}], limit :: pos_integer) ::
              {:ok, [{String.t(), [Convoy.Record.t()]}]} | {:error, term}
end
