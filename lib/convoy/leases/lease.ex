defmodule Convoy.Leases.Lease do
  @moduledoc """
  One item of a KCL 2.x lease table: the lease of one shard, as DynamoDB
  holds it. Built by the NIF from the item's attributes (Elixir names on the
  left, KCL attribute names on the right):

    * `key` - `leaseKey` (S), the shard id
    * `owner` - `leaseOwner` (S), the worker holding it; `nil` when free
    * `counter` - `leaseCounter` (N), incremented by every take, renewal and
      checkpoint, and the condition of every write
    * `checkpoint` - `checkpoint` (S): a sequence number, `"TRIM_HORIZON"`,
      `"LATEST"`, `"AT_TIMESTAMP"` or `"SHARD_END"`
    * `checkpoint_sub_sequence_number` - `checkpointSubSequenceNumber` (N)
    * `owner_switches_since_checkpoint` - `ownerSwitchesSinceCheckpoint` (N)
    * `parent_shard_ids` - `parentShardId` (SS; the KCL's name is singular)
    * `child_shard_ids` - `childShardIds` (SS, written by newer KCL versions)
    * `pending_checkpoint` - `pendingCheckpoint` (S), read only

  ## Example

      %Convoy.Leases.Lease{key: "shardId-000000000000", owner: "node-a", counter: 42,
                           checkpoint: "TRIM_HORIZON"}
  """

  defstruct key: nil,
            owner: nil,
            counter: 0,
            checkpoint: nil,
            checkpoint_sub_sequence_number: 0,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: [],
            child_shard_ids: [],
            pending_checkpoint: nil

  @type t :: %__MODULE__{
          key: String.t(),
          owner: String.t() | nil,
          counter: non_neg_integer,
          checkpoint: String.t() | nil,
          checkpoint_sub_sequence_number: non_neg_integer,
          owner_switches_since_checkpoint: non_neg_integer,
          parent_shard_ids: [String.t()],
          child_shard_ids: [String.t()],
          pending_checkpoint: String.t() | nil
        }

  @doc """
  True for a lease whose shard was read to its end.

  ## Example

      iex> Convoy.Leases.Lease.finished?(%Convoy.Leases.Lease{key: "s", checkpoint: "SHARD_END"})
      true
  """
  @spec finished?(t) :: boolean
  def finished?(%__MODULE__{checkpoint: checkpoint}), do: checkpoint == "SHARD_END"
end
