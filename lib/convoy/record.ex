defmodule Convoy.Record do
  @moduledoc """
  A record read from a stream, as handlers and `Convoy.Queue.get/2` see it.

    * `data` - the record's bytes, exactly as they were put
    * `partition_key` - the key the producer gave
    * `sequence_number` - the record's position in its shard (a decimal string)
    * `shard_id` - the shard it was read from
    * `approximate_arrival_timestamp` - when Kinesis accepted it, a UTC `DateTime`
    * `stream_id` - the `stream_id` of the queue that read it
    * `sub_sequence_number` - for a user record unpacked from a KPL aggregated
      record, its index inside it; `nil` otherwise
    * `explicit_hash_key` - the explicit hash key an aggregated user record
      was put with, if any; `nil` otherwise

  Records are built in Rust, in the shard's dispatcher process when it takes
  a batch the reader read, so handlers receive them without a conversion in
  Elixir.

  ## Keeping records: `data` may share its batch's memory

  `data` of 65 bytes to 4 KiB is a sub-binary of a binary of at most 64 KiB
  shared with the records read with it: one off-heap binary for hundreds of
  small records instead of one each, which is most of what the consumer
  spends per record on the BEAM side. A record stays valid for as long as
  it is kept, but while any part of such a binary is referenced, all of it
  stays in memory: a record kept beyond the handler's call (in a process's
  state, ETS, a cache) keeps up to 64 KiB of data alive, not only its own.
  When a handler keeps a few records of many for long, keep a copy of the
  data instead:

      %{record | data: :binary.copy(record.data)}

  `:binary.referenced_byte_size/1` tells how much a `data` keeps alive.
  Data of at most 64 bytes is copied with its record (nothing shared), and
  data of more than 4 KiB has a binary of its own.

  ## Example

      %Convoy.Record{data: data, partition_key: "device-42"} = record
  """

  @enforce_keys [:data, :partition_key, :sequence_number, :shard_id]
  defstruct [
    :data,
    :partition_key,
    :sequence_number,
    :shard_id,
    :approximate_arrival_timestamp,
    :stream_id,
    :sub_sequence_number,
    :explicit_hash_key
  ]

  @type t :: %__MODULE__{
          data: binary,
          partition_key: String.t(),
          sequence_number: String.t(),
          shard_id: String.t(),
          approximate_arrival_timestamp: DateTime.t() | nil,
          stream_id: term,
          sub_sequence_number: non_neg_integer | nil,
          explicit_hash_key: String.t() | nil
        }
end
