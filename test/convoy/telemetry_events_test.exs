defmodule Convoy.TelemetryEventsTest do
  # The event tables (README "Telemetry" and Convoy.Queue's moduledoc) list
  # exactly the events the code emits. Every event goes through
  # Convoy.Telemetry, and its name is written out in the source as a list
  # literal starting with :convoy: `[:convoy, :queue, :attach]` for an
  # event, `[:convoy, :put_records]` for a span's prefix (its :start, :stop
  # and :exception). The literals are read from the code's AST, so comments
  # and docs do not count.
  use ExUnit.Case, async: true

  @span_ends [:start, :stop, :exception]

  defp emitted do
    for path <- Path.wildcard("lib/**/*.ex"),
        literal <- convoy_lists(Code.string_to_quoted!(File.read!(path))),
        event <- expand(literal),
        uniq: true,
        do: event
  end

  defp convoy_lists(ast) do
    {_, found} =
      Macro.prewalk(ast, [], fn
        [:convoy | rest] = list, acc when rest != [] ->
          if Enum.all?(rest, &is_atom/1), do: {list, [list | acc]}, else: {list, acc}

        node, acc ->
          {node, acc}
      end)

    found
  end

  defp expand([:convoy, _] = prefix), do: Enum.map(@span_ends, &(prefix ++ [&1]))
  defp expand(event), do: [event]

  # The events of a markdown table's rows: the first column's
  # `[:convoy, :a, :b \| :c]`.
  defp table_events(markdown) do
    for line <- String.split(markdown, "\n"),
        [_, inner] <- [Regex.run(~r/^\s*\| `\[(:convoy[^\]]*)\]`/, line)],
        event <- parse(inner),
        uniq: true,
        do: event
  end

  defp parse(inner) do
    parts = String.split(inner, ", ")
    {init, [last]} = Enum.split(parts, -1)
    init = Enum.map(init, &atom/1)

    for alternative <- String.split(last, ~r/\s*\\\|\s*/),
        do: init ++ [atom(alternative)]
  end

  defp atom(":" <> name), do: String.to_atom(String.trim(name))

  defp readme_table do
    [_, telemetry] = String.split(File.read!("README.md"), "\n## Telemetry\n", parts: 2)
    [section | _] = String.split(telemetry, "\n## ", parts: 2)
    table_events(section)
  end

  defp moduledoc_table do
    {:docs_v1, _, _, _, %{"en" => moduledoc}, _, _} = Code.fetch_docs(Convoy.Queue)
    table_events(moduledoc)
  end

  test "the source's events are found, the four original ones among them" do
    events = emitted()

    for event <- [
          [:convoy, :queue, :attach],
          [:convoy, :queue, :detach],
          [:convoy, :queue, :records_sent],
          [:convoy, :queue, :records_received],
          [:convoy, :put_records, :stop],
          [:convoy, :lease, :taken]
        ] do
      assert event in events
    end
  end

  test "the README's table lists every event emitted in lib/, and only those" do
    emitted = Enum.sort(emitted())
    table = Enum.sort(readme_table())
    assert emitted -- table == [], "missing from the README table"
    assert table -- emitted == [], "in the README table but never emitted"
  end

  test "Convoy.Queue's moduledoc table lists every event emitted in lib/, and only those" do
    emitted = Enum.sort(emitted())
    table = Enum.sort(moduledoc_table())
    assert emitted -- table == [], "missing from Convoy.Queue's moduledoc table"
    assert table -- emitted == [], "in Convoy.Queue's moduledoc table but never emitted"
  end
end
