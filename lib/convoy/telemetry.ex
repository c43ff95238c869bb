defmodule Convoy.Telemetry do
  @moduledoc false
  # `:telemetry` is optional: Convoy has no Hex dependencies, but when the
  # host application has telemetry loaded, events are emitted through it.
  #
  # Whether it is loaded is decided once, when the :convoy application
  # starts (`setup/0`), not on every event. Queues started while it is off
  # tell their Rust tasks so, and those send no per-request reports at all.
  #
  # Span events follow the :telemetry convention: `:start` with
  # `%{monotonic_time, system_time}`, then `:stop` or `:exception` with
  # `%{duration, monotonic_time}`, all three with the same
  # `telemetry_span_context` in their metadata.

  @key {__MODULE__, :enabled}

  @doc "Decides, once, whether events are emitted: when `:telemetry` is loaded."
  @spec setup() :: boolean
  def setup do
    enabled = Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)
    :persistent_term.put(@key, enabled)
    enabled
  end

  @doc "Whether events are emitted."
  @spec enabled?() :: boolean
  def enabled?, do: :persistent_term.get(@key, false)

  @doc false
  # Convoy's own tests turn emission off and on; queues started afterwards
  # see the change.
  @spec put_enabled(boolean) :: :ok
  def put_enabled(enabled) when is_boolean(enabled), do: :persistent_term.put(@key, enabled)

  @spec execute([atom], map, map) :: :ok
  def execute(event, measurements, metadata) do
    if enabled?() do
      # credo:disable-for-next-line
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end

  @typedoc "An open span; nil when events are off."
  @type span :: {reference, integer, map} | nil

  @doc """
  Starts a span: emits `prefix ++ [:start]` and returns what `stop/4` and
  `exception/6` need (nil, and nothing emitted, when events are off).
  """
  @spec start([atom], map) :: span
  def start(prefix, metadata) do
    if enabled?(), do: start_at(prefix, System.monotonic_time(), metadata)
  end

  @doc "Same as `start/2` for a span that began at `monotonic_time` (native units)."
  @spec start_at([atom], integer, map) :: span
  def start_at(prefix, monotonic_time, metadata) do
    metadata = Map.put(metadata, :telemetry_span_context, make_ref())
    offset = System.time_offset()

    execute(
      prefix ++ [:start],
      %{monotonic_time: monotonic_time, system_time: monotonic_time + offset},
      metadata
    )

    {metadata.telemetry_span_context, monotonic_time, metadata}
  end

  @doc "Ends a span with `prefix ++ [:stop]`, adding `measurements`."
  @spec stop([atom], span, map, map) :: :ok
  def stop(prefix, span, measurements \\ %{}, extra \\ %{})
  def stop(_prefix, nil, _measurements, _extra), do: :ok

  def stop(prefix, {_ctx, started, metadata}, measurements, extra) do
    now = System.monotonic_time()

    execute(
      prefix ++ [:stop],
      Map.merge(measurements, %{duration: now - started, monotonic_time: now}),
      Map.merge(metadata, extra)
    )
  end

  @doc "Ends a span with `prefix ++ [:exception]`."
  @spec exception([atom], span, atom, term, list, map) :: :ok
  def exception(prefix, span, kind, reason, stacktrace, extra \\ %{})
  def exception(_prefix, nil, _kind, _reason, _stacktrace, _extra), do: :ok

  def exception(prefix, {_ctx, started, metadata}, kind, reason, stacktrace, extra) do
    now = System.monotonic_time()

    execute(
      prefix ++ [:exception],
      %{duration: now - started, monotonic_time: now},
      metadata
      |> Map.merge(extra)
      |> Map.merge(%{kind: kind, reason: reason, stacktrace: stacktrace})
    )
  end

  @doc """
  A span that already happened, reported by Rust with its duration in
  nanoseconds: emits its start and its stop (or exception, for `error`).
  """
  @spec reported([atom], non_neg_integer, map, map, term) :: :ok
  def reported(prefix, duration_ns, measurements, metadata, error) do
    now = System.monotonic_time()
    duration = System.convert_time_unit(duration_ns, :nanosecond, :native)
    span = start_at(prefix, now - duration, metadata)

    case error do
      nil -> stop(prefix, span, measurements)
      reason -> exception(prefix, span, :error, reason, [], %{})
    end
  end
end
