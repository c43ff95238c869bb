defmodule Convoy.Leases.BalanceTest do
  use ExUnit.Case, async: true
  doctest Convoy.Leases.Balance
  doctest Convoy.Leases.Lease

  alias Convoy.Leases.{Balance, Lease}

  defp leases(owners) do
    owners
    |> Enum.with_index()
    |> Enum.map(fn {owner, i} -> %Lease{key: "shard-#{i}", owner: owner, counter: 1} end)
  end

  defp keys(leases), do: Enum.map(leases, & &1.key)

  describe "observe/4" do
    test "a counter that does not move for the failover time makes the lease available" do
      ls = leases(["a", "a"])
      {seen, available} = Balance.observe(%{}, ls, 1_000, 10_000)
      assert MapSet.size(available) == 0

      {seen, available} = Balance.observe(seen, ls, 10_999, 10_000)
      assert MapSet.size(available) == 0

      # One lease renewed meanwhile (counter moved): only the other expires.
      [l0, l1] = ls
      ls = [%{l0 | counter: 2}, l1]
      {_seen, available} = Balance.observe(seen, ls, 11_000, 10_000)
      assert MapSet.to_list(available) == ["shard-1"]
    end

    test "a lease without owner is available at once; forgotten keys are dropped" do
      ls = leases([nil, "a"])
      {seen, available} = Balance.observe(%{"gone" => {1, 0}}, ls, 0, 10_000)
      assert MapSet.to_list(available) == ["shard-0"]
      refute Map.has_key?(seen, "gone")
    end
  end

  describe "to_take/4" do
    test "a new worker aims at ceil(leases / workers), stealing one per round" do
      ls = leases(List.duplicate("a", 8))
      assert [%Lease{owner: "a"}] = Balance.to_take(ls, MapSet.new(), "b", shuffle: false)

      # 5 / 3 each way: b needs 1 more, a holds more than the target.
      ls = leases(List.duplicate("a", 5) ++ List.duplicate("b", 3))
      assert [%Lease{owner: "a"}] = Balance.to_take(ls, MapSet.new(), "b", shuffle: false)

      # 4 / 4: balanced, nothing to do.
      ls = leases(List.duplicate("a", 4) ++ List.duplicate("b", 4))
      assert [] == Balance.to_take(ls, MapSet.new(), "b", shuffle: false)
      assert [] == Balance.to_take(ls, MapSet.new(), "a", shuffle: false)
    end

    test "available leases first, up to the target" do
      ls = leases([nil, nil, nil, nil, "a", "a", "a", "a"])
      available = MapSet.new(["shard-0", "shard-1", "shard-2", "shard-3"])
      taken = Balance.to_take(ls, available, "b", shuffle: false)
      # Workers a (4) and b (0): target 4, all four free ones.
      assert keys(taken) == ["shard-0", "shard-1", "shard-2", "shard-3"]

      # Alone, a worker takes everything that is available.
      taken =
        Balance.to_take(
          leases(List.duplicate(nil, 8)),
          MapSet.new(Enum.map(0..7, &"shard-#{&1}")),
          "a"
        )

      assert length(taken) == 8
    end

    test "three workers on eight leases settle at 3/3/2 and then stop moving" do
      ls = leases(List.duplicate("a", 4) ++ List.duplicate("b", 4))
      assert [_] = Balance.to_take(ls, MapSet.new(), "c", shuffle: false)

      ls = leases(["c"] ++ List.duplicate("a", 3) ++ List.duplicate("b", 4))
      assert [%Lease{owner: "b"}] = Balance.to_take(ls, MapSet.new(), "c", shuffle: false)

      settled = leases(["c", "c"] ++ List.duplicate("a", 3) ++ List.duplicate("b", 3))
      for me <- ["a", "b", "c"], do: assert([] == Balance.to_take(settled, MapSet.new(), me))
    end

    test "more workers than leases: one each, no stealing from a worker with one" do
      ls = leases(["a", "b"])
      assert [] == Balance.to_take(ls, MapSet.new(), "c")

      assert [%Lease{owner: "a"}] =
               Balance.to_take(leases(["a", "a"]), MapSet.new(), "c", shuffle: false)
    end

    test "no leases, nothing to take" do
      assert [] == Balance.to_take([], MapSet.new(), "a")
    end
  end
end
