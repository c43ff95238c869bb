defmodule Convoy.OptionsSchemaTest do
  # The options schema (Convoy.Queue.Options) drives validation, the docs of
  # Convoy.Queue.start_link/1 and README.md's options table.
  use ExUnit.Case, async: true

  alias Convoy.Queue.Options

  @readme Path.expand("../../README.md", __DIR__)
  @table_start "<!-- options table: generated from Convoy.Queue.Options, see test/convoy/options_schema_test.exs -->"
  @table_end "<!-- end of options table -->"
  @regenerate "CONVOY_UPDATE_README=1 MIX_ENV=test mix test test/convoy/options_schema_test.exs"

  describe "README.md" do
    # Set CONVOY_UPDATE_README=1 to rewrite the table instead of checking it.
    test "has the options table the schema renders" do
      readme = File.read!(@readme)

      {before, table, rest} =
        case String.split(readme, [@table_start, @table_end]) do
          [before, table, rest] ->
            {before, table, rest}

          _ ->
            flunk(
              "README.md must hold the options table between the lines\n" <>
                "#{@table_start}\nand\n#{@table_end}"
            )
        end

      expected = "\n\n" <> Options.readme_table() <> "\n"

      if System.get_env("CONVOY_UPDATE_README") == "1" do
        File.write!(@readme, before <> @table_start <> expected <> @table_end <> rest)
      else
        assert table == expected, """
        README.md's options table differs from the schema in lib/convoy/queue/options.ex.
        Change the schema, not the table, then regenerate the table with:

            #{@regenerate}

        Only in README.md:
        #{only(table, expected)}
        Only in the schema's table:
        #{only(expected, table)}
        """
      end
    end
  end

  describe "docs of Convoy.Queue.start_link/1" do
    test "list every option, rendered from the schema" do
      {:docs_v1, _, _, _, _, _, docs} = Code.fetch_docs(Convoy.Queue)

      [doc] = for {{:function, :start_link, 1}, _, _, %{"en" => doc}, _} <- docs, do: doc

      assert doc =~ "## Options\n\n" <> Options.docs() <> "\n## Examples"

      for {key, _spec} <- Options.schema() do
        assert doc =~ "* `#{inspect(key)}` (", "#{inspect(key)} is not documented"
      end
    end

    test "render the type, the default and the unit of an option" do
      docs = Options.docs()

      assert docs =~
               "* `:stream` (a stream name of 1..128 bytes, as a string or an atom (for\n    Kinesis, of [a-zA-Z0-9_.-])) - Required."

      assert docs =~ "* `:batch_timeout` (a non-negative integer, in ms) - "
      assert docs =~ "Defaults to `5000`."
      assert docs =~ "Defaults to `67_108_864` (64 MiB)."
      assert docs =~ "Defaults to the `:stream` name."
      assert docs =~ "* `:poll_interval` (`nil` or a positive integer, in ms)"

      # A Markdown list: items and their indented continuation lines.
      for line <- String.split(docs, "\n", trim: true) do
        assert String.starts_with?(line, ["  * `:", "    "]), line
      end

      for {key, spec} <- Options.schema() ++ Options.handler_schema() do
        ticks = spec[:doc] |> String.graphemes() |> Enum.count(&(&1 == "`"))
        assert rem(ticks, 2) == 0, "unbalanced backticks in the doc of #{inspect(key)}"
      end
    end

    test "the handler options are rendered the same way" do
      docs = Options.handler_docs()

      for {key, _spec} <- Options.handler_schema() do
        assert docs =~ "* `#{inspect(key)}` ("
      end

      assert docs =~ "(a positive integer or `:infinity`, in ms)"
      assert docs =~ "Defaults to `:infinity`."
    end
  end

  describe "the schema" do
    test "every entry has a type and a doc whose first sentence fits a table row" do
      for {key, spec} <- Options.schema() ++ Options.handler_schema() do
        assert Keyword.has_key?(spec, :type), "#{inspect(key)} has no :type"
        assert is_binary(spec[:doc]) and spec[:doc] != "", "#{inspect(key)} has no :doc"
        assert Keyword.keys(spec) -- [:type, :default, :required, :unit, :default_doc, :doc] == []
      end

      for row <- Options.readme_table() |> String.split("\n", trim: true) |> Enum.drop(2) do
        meaning = row |> String.split(" | ") |> List.last()
        assert String.length(meaning) <= 120, "too long for the README table: #{meaning}"
      end
    end

    test "is where the defaults live, and they pass their own checks" do
      options = Options.validate!(stream: "s")
      assert Enum.sort(Keyword.keys(options)) == Enum.sort(Keyword.keys(Options.schema()))

      normalized = [:stream, :stream_id, :kinesis, :checkpoint]

      for {key, spec} <- Options.schema(), key not in normalized do
        assert options[key] == spec[:default], "#{inspect(key)}"
      end

      defaults = Options.defaults()
      assert Keyword.keys(defaults) == Keyword.keys(Options.schema())

      assert Keyword.take(defaults, [:service, :batch_timeout, :poll_interval, :iterator_type]) ==
               [
                 service: Convoy.Services.Kinesis,
                 batch_timeout: 5000,
                 poll_interval: nil,
                 iterator_type: :latest
               ]

      assert options[:stream_id] == "s"
      assert options[:checkpoint] == {Convoy.Checkpoint.Memory, []}
      assert %Convoy.KinesisConfig{} = options[:kinesis]
      assert {:ok, opts} = Options.handler(fn _, _ -> :ok end, [])

      assert Enum.sort(opts) == [
               ack_timeout: :infinity,
               on_error: :detach,
               partition_keys: nil,
               replace: false
             ]
    end

    test "validated options validate again to themselves (child_spec/1, then start_link/1)" do
      handler = fn _record, _config -> :ok end

      options =
        Options.validate!(
          stream: :events,
          checkpoint: Convoy.Checkpoint.Memory,
          kinesis: [region: "eu-west-1"],
          handlers: [{:a, handler, nil}, {:b, self(), nil, ack_timeout: 1_000}]
        )

      assert Options.validate!(options) == options

      assert [{:a, ^handler, nil, a_opts}, {:b, _, nil, b_opts}] = options[:handlers]
      assert a_opts[:on_error] == :detach
      assert b_opts[:ack_timeout] == 1_000
    end
  end

  describe "errors name the option and the value" do
    test "for the types of the schema" do
      cases = [
        {[aggregation: 1],
         "invalid Convoy.Queue option :aggregation: expected a boolean, got: 1"},
        {[service_options: :x],
         "invalid Convoy.Queue option :service_options: expected a keyword list, got: :x"},
        {[max_buffered_bytes: 0],
         "invalid Convoy.Queue option :max_buffered_bytes: expected a positive integer (bytes), got: 0"},
        {[poll_limit: 10_001],
         "invalid Convoy.Queue option :poll_limit: expected an integer in 1..10000, got: 10001"},
        {[aggregation_max_bytes: 1000],
         "invalid Convoy.Queue option :aggregation_max_bytes: " <>
           "expected an integer of at least 1 KiB (bytes), got: 1000"},
        {[poll_interval: :never],
         "invalid Convoy.Queue option :poll_interval: " <>
           "expected nil or a positive integer (ms), got: :never"},
        {[on_failure: "nope"],
         "invalid Convoy.Queue option :on_failure: " <>
           ~s(expected nil, a pid, a registered name or a 1-arity function, got: "nope")},
        {[retry_deadline: 1.5],
         "invalid Convoy.Queue option :retry_deadline: expected a positive integer (ms), got: 1.5"}
      ]

      for {options, message} <- cases do
        error = assert_raise ArgumentError, fn -> Options.validate!([stream: "s"] ++ options) end
        assert Exception.message(error) == message
      end
    end

    test "for rules across options and handler entries" do
      cases = [
        {[aggregation: true, aggregation_max_bytes: 2 * 1024 * 1024],
         ~r/:aggregation_max_bytes: 2097152 exceeds :max_record_bytes \(1048576\)/},
        {[handlers: :none], ~r/option :handlers: expected a list of \{id, handler, config\}/},
        {[handlers: [{:a}]], ~r/option :handlers: bad entry \{:a\}/},
        {[handlers: [{:a, self(), nil}, {:a, self(), nil}]],
         ~r/option :handlers: duplicate ids in \[:a, :a\]/},
        {[handlers: [{:a, self(), nil, on_error: :explode}]],
         ~r/option :handlers: :a: \{:invalid_on_error, :explode\}/}
      ]

      for {options, message} <- cases do
        assert_raise ArgumentError, message, fn -> Options.validate!([stream: "s"] ++ options) end
      end

      # Aggregation off: the size is not checked against :max_record_bytes.
      assert Options.validate!(stream: "s", aggregation_max_bytes: 2 * 1024 * 1024)
    end

    test "handler options answer error tuples" do
      fun = fn _record, _config -> :ok end

      assert Options.handler(:nope, []) == {:error, {:invalid_handler, :nope}}
      assert Options.handler(fun, :x) == {:error, {:invalid_options, :x}}
      assert Options.handler(fun, bogus: 1) == {:error, {:unknown_options, [:bogus]}}
      assert Options.handler(fun, partition_keys: [1]) == {:error, {:invalid_partition_keys, [1]}}

      assert Options.handler(fun, on_error: {:retry, 0}) ==
               {:error, {:invalid_on_error, {:retry, 0}}}

      assert Options.handler(fun, ack_timeout: 0) == {:error, {:invalid_ack_timeout, 0}}

      assert {:ok, opts} =
               Options.handler(fun, partition_keys: "k", on_error: {:retry, 3}, ack_timeout: 50)

      assert opts[:partition_keys] == "k"
      assert opts[:on_error] == {:retry, 3}
    end
  end

  defp only(text, other) do
    (String.split(text, "\n", trim: true) -- String.split(other, "\n", trim: true))
    |> Enum.map_join(&"    #{&1}\n")
  end
end
