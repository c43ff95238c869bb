defmodule Convoy.Telemetry do
  @moduledoc false
  # `:telemetry` is optional: Convoy has no Hex dependencies, but when the
  # host application has telemetry loaded, events are emitted through it.

  @spec execute([atom], map, map) :: :ok
  def execute(event, measurements, metadata) do
    if Code.ensure_loaded?(:telemetry) do
      # credo:disable-for-next-line
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end
end
