defmodule Convoy.ServiceExampleTest do
  # The custom service in Convoy.Service's docs, compiled from the docs
  # themselves and driven through Convoy.Queue, so the example stays true.
  use ExUnit.Case, async: true

  test "the example service in Convoy.Service's docs compiles and carries records to a handler" do
    {:docs_v1, _, :elixir, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Convoy.Service)
    [_, example] = String.split(moduledoc, "## Example", parts: 2)

    code =
      example
      |> String.split("\n")
      |> Enum.filter(&String.starts_with?(&1, "    "))
      |> Enum.map_join("\n", &String.replace_prefix(&1, "    ", ""))

    {spec, _} = Code.eval_string(code)
    assert {Convoy.Queue, options} = spec
    assert options[:service] == MyApp.ListService

    start_supervised!({Convoy.Queue, options})
    me = self()

    :ok =
      Convoy.Queue.attach_handler("list", :fwd, fn record, _ -> send(me, {:got, record}) end, nil)

    for i <- 1..3, do: :ok = Convoy.Queue.put("list", "k", "r#{i}")

    for i <- 1..3 do
      expected = "r#{i}"
      assert_receive {:got, %Convoy.Record{data: ^expected, partition_key: "k"}}, 5_000
    end

    assert %{sent: 3} = Convoy.Queue.stats("list")
  end
end
