defmodule Mix.Tasks.Convoy.Local do
  @shortdoc "Runs the embedded local Kinesis on 127.0.0.1"
  @moduledoc """
  Runs the embedded local Kinesis (see `Convoy.Local`) until interrupted.

      mix convoy.local [--port 4567] [--stream NAME[:SHARDS]]... [--enforce-limits]

  Each `--stream` is created once the emulator answers. Point a queue at it
  with `kinesis: [endpoint_url: "http://127.0.0.1:4567"]`.

  ## Example

      mix convoy.local --port 4567 --stream events:4
  """
  use Mix.Task

  @impl true
  @doc "Starts the emulator and waits."
  @spec run([String.t()]) :: no_return
  def run(args) do
    {opts, _, invalid} =
      OptionParser.parse(args,
        strict: [
          port: :integer,
          stream: :keep,
          enforce_limits: :boolean,
          iterator_ttl_seconds: :integer
        ]
      )

    if invalid != [], do: Mix.raise("invalid options: #{inspect(invalid)}")
    Mix.Task.run("app.start")

    local_options =
      [
        port: Keyword.get(opts, :port, 4567),
        enforce_limits: Keyword.get(opts, :enforce_limits, false)
      ] ++
        Keyword.take(opts, [:iterator_ttl_seconds])

    {:ok, local} = Convoy.Local.start_link(local_options)
    endpoint = Convoy.Local.endpoint(local)

    for spec <- Keyword.get_values(opts, :stream) do
      {name, shards} =
        case String.split(spec, ":") do
          [name] -> {name, 1}
          [name, shards] -> {name, String.to_integer(shards)}
        end

      :ok = Convoy.Local.create_stream(endpoint, name, shards)
      Mix.shell().info("created stream #{name} with #{shards} shard(s)")
    end

    Mix.shell().info("local Kinesis on #{endpoint} (Ctrl-C twice to stop)")
    Process.sleep(:infinity)
  end
end
