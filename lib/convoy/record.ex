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

  Records are built in Rust (a rustler `NifStruct`) as they are read, so
  handlers receive them without a conversion in Elixir.

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
