defmodule Convoy.Queue.Options do
  @moduledoc false
  # Validation of `Convoy.Queue.start_link/1` options, done once at start.
  # Every failure raises an ArgumentError naming the key and the value.

  @mib 1024 * 1024

  @defaults [
    stream: nil,
    stream_id: nil,
    service: Convoy.Services.Kinesis,
    service_options: [],
    batch_timeout: 5_000,
    poll_interval: nil,
    iterator_type: :latest,
    kinesis: [],
    checkpoint: Convoy.Checkpoint.Memory,
    max_in_flight: 8,
    max_buffered_records: 100_000,
    max_buffered_bytes: 64 * @mib,
    max_record_bytes: @mib,
    max_retries: 10,
    retry_deadline: 60_000,
    retry_backoff: 100,
    max_backoff: 5_000,
    on_failure: nil,
    aggregation: false,
    aggregation_max_bytes: 50 * 1024,
    shutdown: 30_000,
    poll_limit: 10_000,
    shard_refresh_interval: 60_000,
    handlers: []
  ]

  @doc false
  def defaults, do: @defaults

  @spec validate!(keyword) :: keyword
  def validate!(options) do
    unless is_list(options) and Keyword.keyword?(options) do
      raise ArgumentError, "Convoy.Queue options must be a keyword list, got: #{inspect(options)}"
    end

    options =
      case Keyword.validate(options, @defaults) do
        {:ok, options} ->
          options

        {:error, unknown} ->
          raise ArgumentError,
                "unknown Convoy.Queue options #{inspect(unknown)}; known options: " <>
                  inspect(Keyword.keys(@defaults))
      end

    stream = stream!(options[:stream])

    options
    |> Keyword.put(:stream, stream)
    |> Keyword.update!(:stream_id, &if(is_nil(&1), do: stream, else: &1))
    |> check(:service, &service?/1, "a module implementing Convoy.Service")
    |> check(:service_options, &(is_list(&1) and Keyword.keyword?(&1)), "a keyword list")
    |> check(:batch_timeout, &non_neg_integer?/1, "a non-negative integer (ms)")
    |> check(:poll_interval, &(is_nil(&1) or pos_integer?(&1)), "nil or a positive integer (ms)")
    |> check(:iterator_type, &iterator_type?/1, iterator_types())
    |> check(:kinesis, &kinesis?/1, "a keyword list")
    |> check(
      :checkpoint,
      &checkpoint?/1,
      "a module implementing Convoy.Checkpoint or {module, options}"
    )
    |> check(:max_in_flight, &(pos_integer?(&1) and &1 <= 256), "an integer in 1..256")
    |> check(:max_buffered_records, &pos_integer?/1, "a positive integer")
    |> check(:max_buffered_bytes, &pos_integer?/1, "a positive integer (bytes)")
    |> check(
      :max_record_bytes,
      &(pos_integer?(&1) and &1 <= 10 * @mib),
      "an integer in 1..10 MiB"
    )
    |> check(:max_retries, &non_neg_integer?/1, "a non-negative integer")
    |> check(:retry_deadline, &pos_integer?/1, "a positive integer (ms)")
    |> check(:retry_backoff, &pos_integer?/1, "a positive integer (ms)")
    |> check(:max_backoff, &pos_integer?/1, "a positive integer (ms)")
    |> check(:on_failure, &on_failure?/1, "nil, a pid, a registered name or a 1-arity function")
    |> check(:aggregation, &is_boolean/1, "a boolean")
    |> check(
      :aggregation_max_bytes,
      &(pos_integer?(&1) and &1 >= 1024),
      "an integer of at least 1024 (bytes)"
    )
    |> check(:shutdown, &pos_integer?/1, "a positive integer (ms)")
    |> check(:poll_limit, &(pos_integer?(&1) and &1 <= 10_000), "an integer in 1..10000")
    |> check(:shard_refresh_interval, &pos_integer?/1, "a positive integer (ms)")
    |> check(
      :handlers,
      &is_list/1,
      "a list of {id, handler, config} or {id, handler, config, opts}"
    )
    |> check_handlers!()
    |> check_aggregation_size!()
    |> Keyword.update!(:kinesis, &resolve_kinesis/1)
    |> Keyword.update!(:checkpoint, &normalize_checkpoint/1)
  end

  defp stream!(stream) when is_binary(stream) and stream != "" and byte_size(stream) <= 128,
    do: stream

  defp stream!(nil), do: raise(ArgumentError, "Convoy.Queue option :stream is required")

  defp stream!(stream) when is_atom(stream) and stream not in [true, false],
    do: stream!(Atom.to_string(stream))

  defp stream!(other) do
    raise ArgumentError,
          "invalid Convoy.Queue option :stream: expected a stream name (1..128 characters), got: " <>
            inspect(other)
  end

  defp check(options, key, valid?, expected) do
    value = Keyword.fetch!(options, key)

    if valid?.(value) do
      options
    else
      raise ArgumentError,
            "invalid Convoy.Queue option #{inspect(key)}: expected #{expected}, got: #{inspect(value)}"
    end
  end

  defp check_aggregation_size!(options) do
    if options[:aggregation] and options[:aggregation_max_bytes] > options[:max_record_bytes] do
      raise ArgumentError,
            "invalid Convoy.Queue option :aggregation_max_bytes: #{options[:aggregation_max_bytes]} " <>
              "exceeds :max_record_bytes (#{options[:max_record_bytes]})"
    end

    options
  end

  # Options pass through here twice (child_spec/1, then start_link/1): an
  # already resolved config stays as it is.
  defp kinesis?(%Convoy.KinesisConfig{}), do: true
  defp kinesis?(options), do: is_list(options) and Keyword.keyword?(options)

  defp resolve_kinesis(%Convoy.KinesisConfig{} = config), do: config
  defp resolve_kinesis(options), do: Convoy.KinesisConfig.resolve(options)

  defp non_neg_integer?(v), do: is_integer(v) and v >= 0
  defp pos_integer?(v), do: is_integer(v) and v > 0

  defp service?(module) do
    is_atom(module) and Code.ensure_loaded?(module) and function_exported?(module, :child_spec, 1) and
      function_exported?(module, :put, 4)
  end

  defp iterator_types,
    do:
      ":latest, :trim_horizon, {:at_sequence_number, s}, {:after_sequence_number, s} " <>
        "or {:at_timestamp, %DateTime{}}"

  defp iterator_type?(:latest), do: true
  defp iterator_type?(:trim_horizon), do: true
  defp iterator_type?({:at_sequence_number, s}), do: sequence?(s)
  defp iterator_type?({:after_sequence_number, s}), do: sequence?(s)
  defp iterator_type?({:at_timestamp, %DateTime{}}), do: true
  defp iterator_type?(_), do: false

  defp sequence?(s), do: is_binary(s) and String.match?(s, ~r/^\d+$/)

  defp checkpoint?({module, opts}) when is_atom(module) and is_list(opts),
    do: checkpoint_module?(module)

  defp checkpoint?(module) when is_atom(module), do: checkpoint_module?(module)
  defp checkpoint?(_), do: false

  defp checkpoint_module?(module),
    do: Code.ensure_loaded?(module) and function_exported?(module, :init, 1)

  defp normalize_checkpoint({module, opts}), do: {module, opts}
  defp normalize_checkpoint(module), do: {module, []}

  defp on_failure?(nil), do: true
  defp on_failure?(pid) when is_pid(pid), do: true
  defp on_failure?(name) when is_atom(name), do: true
  defp on_failure?(fun) when is_function(fun, 1), do: true
  defp on_failure?(_), do: false

  @doc false
  # Checks a handler and its options; used by attach_handler/5 and :handlers.
  @spec handler(term, term) :: {:ok, keyword} | {:error, term}
  def handler(handler, opts) do
    cond do
      not (is_function(handler, 2) or is_pid(handler)) ->
        {:error, {:invalid_handler, handler}}

      not (is_list(opts) and Keyword.keyword?(opts)) ->
        {:error, {:invalid_options, opts}}

      true ->
        case Keyword.validate(opts, partition_keys: nil, on_error: :detach, ack_timeout: :infinity) do
          {:ok, opts} -> check_handler_options(opts)
          {:error, unknown} -> {:error, {:unknown_options, unknown}}
        end
    end
  end

  defp check_handler_options(opts) do
    keys = opts[:partition_keys]
    on_error = opts[:on_error]
    ack_timeout = opts[:ack_timeout]

    cond do
      not (is_nil(keys) or is_binary(keys) or is_function(keys, 1) or
               (is_list(keys) and Enum.all?(keys, &is_binary/1))) ->
        {:error, {:invalid_partition_keys, keys}}

      not (on_error in [:detach, :retry] or
               match?({:retry, n} when is_integer(n) and n > 0, on_error)) ->
        {:error, {:invalid_on_error, on_error}}

      not (ack_timeout == :infinity or (is_integer(ack_timeout) and ack_timeout > 0)) ->
        {:error, {:invalid_ack_timeout, ack_timeout}}

      true ->
        {:ok, opts}
    end
  end

  defp check_handlers!(options) do
    handlers =
      Enum.map(options[:handlers], fn
        {id, handler, config} ->
          start_handler!(id, handler, config, [])

        {id, handler, config, opts} ->
          start_handler!(id, handler, config, opts)

        other ->
          raise ArgumentError,
                "invalid Convoy.Queue option :handlers: bad entry #{inspect(other)}"
      end)

    ids = Enum.map(handlers, &elem(&1, 0))

    if length(Enum.uniq(ids)) != length(ids) do
      raise ArgumentError,
            "invalid Convoy.Queue option :handlers: duplicate ids in #{inspect(ids)}"
    end

    Keyword.put(options, :handlers, handlers)
  end

  defp start_handler!(id, handler, config, opts) do
    case handler(handler, opts) do
      {:ok, opts} ->
        {id, handler, config, opts}

      {:error, reason} ->
        raise ArgumentError,
              "invalid Convoy.Queue option :handlers: #{inspect(id)}: #{inspect(reason)}"
    end
  end
end
