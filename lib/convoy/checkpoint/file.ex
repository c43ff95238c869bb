defmodule Convoy.Checkpoint.File do
  @moduledoc """
  Durable checkpoints: one small file per shard under `dir`, replaced
  atomically (write to a temporary file, then rename), so a crash leaves the
  previous checkpoint or the new one, never a torn one.

  ## Options

    * `:dir` - required. The directory; created if missing.

  ## Example

      {Convoy.Queue,
       stream: "events",
       poll_interval: 1_000,
       checkpoint: {Convoy.Checkpoint.File, dir: "priv/checkpoints"}}
  """
  @behaviour Convoy.Checkpoint

  @impl true
  @doc "Checks `:dir` and creates it."
  @spec init(keyword) :: {:ok, Path.t()}
  def init(options) do
    dir = options[:dir]

    unless is_binary(dir) and dir != "" do
      raise ArgumentError, "Convoy.Checkpoint.File needs a :dir option, got: #{inspect(dir)}"
    end

    File.mkdir_p!(dir)
    {:ok, dir}
  end

  @impl true
  @doc "Reads a shard's checkpoint."
  @spec fetch(Path.t(), term, String.t()) :: {:ok, Convoy.Checkpoint.position()} | :error
  def fetch(dir, stream_id, shard_id) do
    case File.read(path(dir, stream_id, shard_id)) do
      {:ok, "shard_end"} -> {:ok, :shard_end}
      {:ok, "at_timestamp:" <> ms} -> {:ok, {:at_timestamp, String.to_integer(ms)}}
      {:ok, sequence} when sequence != "" -> {:ok, decode(sequence)}
      _ -> :error
    end
  end

  @impl true
  @doc "Stores a shard's checkpoint."
  @spec store(Path.t(), term, String.t(), Convoy.Checkpoint.position()) :: :ok
  def store(dir, stream_id, shard_id, position) do
    target = path(dir, stream_id, shard_id)
    tmp = target <> ".tmp"
    File.write!(tmp, encode(position), [:sync])
    File.rename!(tmp, target)
  end

  defp encode(:shard_end), do: "shard_end"
  defp encode({:at_timestamp, ms}) when is_integer(ms), do: "at_timestamp:#{ms}"
  defp encode(sequence) when is_binary(sequence), do: sequence

  # Sequence numbers are digits only: "/" separates the sub-sequence number.
  defp encode({sequence, sub}) when is_binary(sequence) and is_integer(sub),
    do: "#{sequence}/#{sub}"

  defp decode(text) do
    case String.split(text, "/") do
      [sequence, sub] -> {sequence, String.to_integer(sub)}
      [sequence] -> sequence
    end
  end

  defp path(dir, stream_id, shard_id) do
    name =
      stream_id
      |> Convoy.Queue.Topology.key()
      |> :erlang.term_to_binary()
      |> :erlang.md5()
      |> Base.url_encode64(padding: false)

    Path.join(dir, "#{binary_part(name, 0, 16)}.#{shard_id}")
  end
end
