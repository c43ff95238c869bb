defmodule Convoy.Leases.Balance do
  @moduledoc ~S"""
  The lease-taking rules of the KCL 2.x (`DynamoDBLeaseTaker`), as pure
  functions, so they are tested without DynamoDB.

    * `observe/4` tracks when each lease's counter last moved, on the local
      monotonic clock (clocks of different machines are never compared): a
      lease is *available* when it has no owner, or when its counter has not
      moved for the failover time. A lease seen for the first time counts as
      renewed at that moment, unless it has no owner.
    * `to_take/4` decides which leases a worker takes in one round: each
      worker aims at `ceil(leases / workers)` (at least 1); available leases
      are taken first; when none is available, at most `:max_steal` (1) lease
      is stolen from the most loaded worker, and only when that worker holds
      at least the target.

  ## Example

      iex> alias Convoy.Leases.{Balance, Lease}
      iex> leases = for i <- 1..4, do: %Lease{key: "s#{i}", owner: "a", counter: 1}
      iex> {seen, available} = Balance.observe(%{}, leases, 0, 10_000)
      iex> MapSet.size(available)
      0
      iex> {_seen, available} = Balance.observe(seen, leases, 10_000, 10_000)
      iex> MapSet.size(available)
      4
      iex> Balance.to_take(leases, MapSet.new(), "b", shuffle: false) |> Enum.map(& &1.key)
      ["s1"]
  """

  alias Convoy.Leases.Lease

  @typedoc "Per lease key: the counter last seen and when it was first seen at that value (nil: never renewed)."
  @type seen :: %{String.t() => {non_neg_integer, integer | nil}}

  @doc """
  Records a scan made at `now` (monotonic ms) and returns the updated
  observations with the keys of the available leases. Keys no longer in the
  table are dropped.

  ## Example

      {seen, available} = Convoy.Leases.Balance.observe(%{}, leases, System.monotonic_time(:millisecond), 10_000)
  """
  @spec observe(seen, [Lease.t()], integer, pos_integer) :: {seen, MapSet.t(String.t())}
  def observe(seen, leases, now, failover) do
    seen =
      Map.new(leases, fn %Lease{key: key, counter: counter, owner: owner} ->
        case Map.get(seen, key) do
          {^counter, since} -> {key, {counter, since}}
          nil when is_nil(owner) -> {key, {counter, nil}}
          _ -> {key, {counter, now}}
        end
      end)

    available =
      for %Lease{key: key, owner: owner} <- leases,
          {_, since} = Map.fetch!(seen, key),
          is_nil(owner) or is_nil(since) or now - since >= failover,
          into: MapSet.new(),
          do: key

    {seen, available}
  end

  @doc """
  The leases `me` should take this round, among `leases` (the leases that
  may be worked on: finished ones and children of unfinished parents left
  out), given the keys of the `available` ones. Options: `:max_steal`
  (default 1), `:shuffle` (default true: which available lease, and which
  of the most loaded worker's, is random, so workers do not all race for
  the same one).

  ## Example

      Convoy.Leases.Balance.to_take(leases, available, "worker-1")
  """
  @spec to_take([Lease.t()], MapSet.t(String.t()), String.t(), keyword) :: [Lease.t()]
  def to_take(leases, available, me, options \\ []) do
    max_steal = Keyword.get(options, :max_steal, 1)
    order = if Keyword.get(options, :shuffle, true), do: &Enum.shuffle/1, else: & &1

    counts = counts(leases, available, me)
    workers = map_size(counts)
    total = length(leases)
    target = target(total, workers)
    need = target - Map.fetch!(counts, me)

    free = Enum.filter(leases, &MapSet.member?(available, &1.key))

    cond do
      need <= 0 ->
        []

      free != [] ->
        free |> order.() |> Enum.take(need)

      true ->
        steal(leases, counts, me, need, target, max_steal, order)
    end
  end

  @doc ~S"""
  A lease `me` should give up this round, or nil: when `me` holds more than
  the target while another worker holds less. Giving a lease up is a
  graceful handoff (the shard's batch is finished and checkpointed first),
  so among Convoy nodes leases rarely need stealing, which is abrupt. At
  most one per round.

  ## Example

      iex> alias Convoy.Leases.{Balance, Lease}
      iex> leases = for {o, i} <- Enum.with_index(~w(a a a a a b b b)), do: %Lease{key: "s#{i}", owner: o}
      iex> Balance.to_shed(leases, MapSet.new(), "a", shuffle: false).key
      "s0"
      iex> Balance.to_shed(leases, MapSet.new(), "b")
      nil
  """
  @spec to_shed([Lease.t()], MapSet.t(String.t()), String.t(), keyword) :: Lease.t() | nil
  def to_shed(leases, available, me, options \\ []) do
    order = if Keyword.get(options, :shuffle, true), do: &Enum.shuffle/1, else: & &1
    counts = counts(leases, available, me)
    target = target(length(leases), map_size(counts))
    needy? = Enum.any?(counts, fn {worker, count} -> worker != me and count < target end)

    if Map.fetch!(counts, me) > target and needy? do
      leases
      |> Enum.filter(&(&1.owner == me and not MapSet.member?(available, &1.key)))
      |> order.()
      |> List.first()
    end
  end

  defp target(0, _workers), do: 0
  defp target(total, workers), do: max(1, div(total + workers - 1, workers))

  @doc """
  Leases held per worker, not counting available ones; `me` is always present.

  ## Example

      Convoy.Leases.Balance.counts(leases, MapSet.new(), "worker-1")
      #=> %{"worker-1" => 2, "worker-2" => 3}
  """
  @spec counts([Lease.t()], MapSet.t(String.t()), String.t()) :: %{String.t() => non_neg_integer}
  def counts(leases, available, me) do
    leases
    |> Enum.reject(&MapSet.member?(available, &1.key))
    |> Enum.frequencies_by(& &1.owner)
    |> Map.put_new(me, 0)
  end

  defp steal(leases, counts, me, need, target, max_steal, order) do
    {busiest, most} =
      counts
      |> Map.delete(me)
      |> Enum.sort()
      |> Enum.max_by(fn {_worker, count} -> count end, fn -> {nil, 0} end)

    steal =
      if busiest != nil and most >= target do
        n = min(need, most - target)
        n = if need > 1 and n == 0, do: 1, else: n
        min(n, max_steal)
      else
        0
      end

    if steal > 0 do
      leases |> Enum.filter(&(&1.owner == busiest)) |> order.() |> Enum.take(steal)
    else
      []
    end
  end
end
