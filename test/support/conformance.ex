defmodule Convoy.Conformance do
  @moduledoc false
  # The behaviour every service must show, as ExUnit tests parameterised by
  # an adapter module:
  #
  #   use Convoy.Conformance, adapter: MyAdapter
  #
  # where MyAdapter has queue_options(shards) (the queue options that open a
  # fresh stream with that many shards) and split_shard(queue_options,
  # stream_id, shard_id). SQS and Kafka services will join the same suite.

  defmacro __using__(adapter: adapter) do
    quote do
      import Convoy.TestSupport
      import ExUnit.CaptureLog

      @adapter unquote(adapter)

      defp open!(shards, extra \\ []) do
        options =
          @adapter.queue_options(shards)
          |> Keyword.merge(iterator_type: :trim_horizon, poll_interval: 50, batch_timeout: 20)
          |> Keyword.merge(extra)

        start_supervised!({Convoy.Queue, options}, id: make_ref())
        {Keyword.get(options, :stream_id, options[:stream]), options}
      end

      defp forward(tag) do
        me = self()
        fn record, config -> send(me, {tag, config, record}) end
      end

      # Batches until `count` records came; none may come before the last is acked.
      defp receive_batches(acc, count) when length(acc) >= count, do: acc

      defp receive_batches(acc, count) do
        assert_receive {:convoy_batch, %Convoy.Batch{} = batch}, 15_000
        refute_receive {:convoy_batch, _}, 200
        Convoy.Queue.ack(batch)
        receive_batches(acc ++ Enum.map(batch.records, & &1.data), count)
      end

      defp collect(tag, count) do
        for _ <- 1..count//1 do
          assert_receive {^tag, _config, record}, 15_000
          record
        end
      end

      test "put then get: records come back byte-exact, terms as JSON" do
        {id, _} = open!(2)
        assert {:ok, _} = Convoy.Queue.put(id, "k1", <<0, 255, 1>>, await: 10_000)
        assert {:ok, _} = Convoy.Queue.put(id, "k2", %{"a" => [1, nil, true]}, await: 10_000)
        records = Convoy.Queue.get(id, 10)

        assert Enum.sort(Enum.map(records, &{&1.partition_key, &1.data})) == [
                 {"k1", <<0, 255, 1>>},
                 {"k2", ~s({"a":[1,null,true]})}
               ]

        assert Convoy.Queue.get(id, 10) == []
      end

      test "an awaited put names the shard and sequence number the record is read with" do
        {id, _} = open!(2)

        assert {:ok, %{shard_id: shard, sequence_number: seq}} =
                 Convoy.Queue.put(id, "k", "v", await: 10_000)

        assert [%Convoy.Record{shard_id: ^shard, sequence_number: ^seq, stream_id: ^id}] =
                 Convoy.Queue.get(id, 10)
      end

      test "bad input gets the same errors" do
        {id, _} = open!(1)

        assert Convoy.Queue.put(id, "", "x") ==
                 {:error, {:invalid_partition_key, "must not be empty"}}

        assert Convoy.Queue.put(id, 1, "x") ==
                 {:error, {:invalid_partition_key, "must be a binary"}}

        assert Convoy.Queue.put(id, "k", {:tuple}) ==
                 {:error, {:invalid_data, "a tuple has no JSON form"}}

        assert Convoy.Queue.put(id, "k", "x", explicit_hash_key: "01") ==
                 {:error, {:invalid_explicit_hash_key, ~s("01" is not a decimal integer)}}

        assert Convoy.Queue.put(id, "k", "x", nope: 1) == {:error, {:unknown_options, [:nope]}}
      end

      test "a function handler gets every record once, in order per key, with its config" do
        {id, _} = open!(3)
        :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), :my_config)
        for i <- 1..300, do: :ok = Convoy.Queue.put(id, "key-#{rem(i, 7)}", "#{i}")

        records =
          for _ <- 1..300 do
            assert_receive {:h, :my_config, record}, 15_000
            record
          end

        refute_receive {:h, _, _}, 300

        assert records |> Enum.map(&String.to_integer(&1.data)) |> Enum.sort() ==
                 Enum.to_list(1..300)

        for {_key, group} <- Enum.group_by(records, & &1.partition_key) do
          numbers = Enum.map(group, &String.to_integer(&1.data))
          assert numbers == Enum.sort(numbers)
        end
      end

      test "a pid handler gets batches and the shard reads on after each ack" do
        {id, _} = open!(1, poll_limit: 5)
        :ok = Convoy.Queue.attach_handler(id, :pid, self(), nil)
        for i <- 1..12, do: {:ok, _} = Convoy.Queue.put(id, "k", "#{i}", await: 10_000)

        datas = receive_batches([], 12)
        assert datas == Enum.map(1..12, &"#{&1}")
      end

      test "attach_handler/5 refuses an id in use; detaching an unknown one strictly says so" do
        {id, _} = open!(1)
        assert :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil, [])

        assert Convoy.Queue.attach_handler(id, :h, forward(:h), nil, []) ==
                 {:error, :already_exists}

        assert Convoy.Queue.detach_handler(id, :other, strict: true) == {:error, :not_found}
        assert Convoy.Queue.detach(id, :h) == :ok
      end

      test "detach and attach again resume where reading stopped" do
        {id, _} = open!(2)
        :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)
        for i <- 1..20, do: :ok = Convoy.Queue.put(id, "k#{rem(i, 3)}", "#{i}")
        first = collect(:h, 20)
        :ok = Convoy.Queue.detach_handler(id, :h)

        for i <- 21..40,
            do: {:ok, _} = Convoy.Queue.put(id, "k#{rem(i, 3)}", "#{i}", await: 10_000)

        refute_receive {:h, _, _}, 300
        :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)
        second = collect(:h, 20)

        assert (first ++ second) |> Enum.map(&String.to_integer(&1.data)) |> Enum.sort() ==
                 Enum.to_list(1..40)
      end

      test "partition-key filters" do
        {id, _} = open!(2)
        :ok = Convoy.Queue.attach_handler(id, :a, forward(:a), nil, partition_keys: "a")
        :ok = Convoy.Queue.attach_handler(id, :bc, forward(:bc), nil, partition_keys: ["b", "c"])
        for key <- ~w(a b c d a), do: :ok = Convoy.Queue.put(id, key, key)
        assert collect(:a, 2) |> Enum.map(& &1.partition_key) == ["a", "a"]
        assert collect(:bc, 2) |> Enum.map(& &1.partition_key) |> Enum.sort() == ["b", "c"]
        refute_receive {_, _, %Convoy.Record{}}, 300
      end

      test "a raising handler is logged and detached, the others go on" do
        {id, _} = open!(1)

        log =
          capture_log(fn ->
            :ok =
              Convoy.Queue.attach_handler(id, :bad, fn _, _ -> raise "conformance boom" end, nil)

            :ok = Convoy.Queue.attach_handler(id, :good, forward(:good), nil)
            for i <- 1..5, do: :ok = Convoy.Queue.put(id, "k", "#{i}")
            assert length(collect(:good, 5)) == 5
          end)

        assert log =~ "conformance boom"
        assert Convoy.Queue.detach_handler(id, :bad, strict: true) == {:error, :not_found}
      end

      test "after a shard splits, its records come before its children's" do
        {id, options} = open!(1)
        :ok = Convoy.Queue.attach_handler(id, :h, forward(:h), nil)

        for i <- 1..30,
            do: {:ok, %{shard_id: parent}} = Convoy.Queue.put(id, "k#{i}", "p#{i}", await: 10_000)

        {:ok, %{shard_id: parent}} = Convoy.Queue.put(id, "k", "p-last", await: 10_000)
        :ok = @adapter.split_shard(options, id, parent)

        for i <- 1..30,
            do: {:ok, %{shard_id: child}} = Convoy.Queue.put(id, "k#{i}", "c#{i}", await: 10_000)

        records = collect(:h, 61)
        {from_parent, from_children} = Enum.split_while(records, &(&1.shard_id == parent))
        assert length(from_parent) == 31
        assert Enum.all?(from_children, &String.starts_with?(&1.data, "c"))
      end
    end
  end
end

defmodule Convoy.Conformance.KinesisAdapter do
  @moduledoc false
  import Convoy.TestSupport

  def queue_options(shards) do
    stream = create_stream!(unique_stream("conformance"), shards)
    [stream: stream, kinesis: kinesis(), shard_refresh_interval: 500]
  end

  def split_shard(options, _stream_id, shard_id) do
    {:ok, shards} = Convoy.Local.list_shards(endpoint(), options[:stream])

    %{starting_hash_key: first, ending_hash_key: last} =
      Enum.find(shards, &(&1.shard_id == shard_id))

    middle =
      String.to_integer(first) + div(String.to_integer(last) - String.to_integer(first), 2) + 1

    Convoy.Local.split_shard(endpoint(), options[:stream], shard_id, Integer.to_string(middle))
  end
end

defmodule Convoy.Conformance.MemoryAdapter do
  @moduledoc false
  def queue_options(shards) do
    [
      stream: Convoy.TestSupport.unique_stream("memory"),
      service: Convoy.Services.Memory,
      service_options: [shards: shards]
    ]
  end

  def split_shard(_options, stream_id, shard_id) do
    {:ok, [_, _]} = Convoy.Services.Memory.split_shard(stream_id, shard_id)
    :ok
  end
end
