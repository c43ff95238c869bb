defmodule Convoy.Queue.Options do
  @moduledoc false
  # The options of `Convoy.Queue.start_link/1` and of `attach_handler/5`, as
  # one schema each. A schema is the only place an option's type, default
  # and documentation live; it drives:
  #
  #   * validation, done once at start (`validate!/1`, `handler/2`): every
  #     failure names the key and the value;
  #   * the `## Options` section of `Convoy.Queue.start_link/1` (`docs/0`),
  #     rendered when `Convoy.Queue` is compiled;
  #   * the options table of README.md (`readme_table/0`), which
  #     test/convoy/options_schema_test.exs keeps in step.
  #
  # To add an option, add an entry to `schema/0`; nothing else. An entry is
  # `{key, spec}` where spec has:
  #
  #   * `:type` - one of
  #       :any | :boolean | :keyword
  #       {:integer, min, max}     (max may be :infinity)
  #       {:in, [value, ...]}      (exactly these terms)
  #       {:or, [type, ...]}       (the first type that accepts the value)
  #       {:custom, fun, "description"}
  #     A custom `fun` gets the value and returns `{:ok, value}` (possibly
  #     normalized: options pass through here twice, in child_spec/1 and in
  #     start_link/1, so it must accept what it returns), `:error` (the
  #     message says "expected <description>") or `{:error, message}`.
  #     Descriptions are Markdown: backticks are dropped in error messages.
  #   * `:default` - the value when the option is absent (`nil` if omitted);
  #     `:required` - `true` when there is no default;
  #   * `:unit` - `:ms` or `:bytes`, shown with the type and the default;
  #   * `:default_doc` - Markdown shown instead of the default's value;
  #   * `:doc` - Markdown prose; its first sentence is the option's line in
  #     the README table, so keep it short and self-contained.
  #
  # Rules across options (`:stream_id` from `:stream`, `:aggregation_max_bytes`
  # within `:max_record_bytes`) are applied at the end of `validate!/1` and
  # stated in the entries' docs.

  @kib 1024
  @mib 1024 * 1024

  @doc false
  @spec schema() :: [{atom, keyword}]
  def schema do
    [
      stream: [
        type:
          {:custom, &stream/1,
           "a stream name of 1..128 bytes, as a string or an atom (for Kinesis, of [a-zA-Z0-9_.-])"},
        required: true,
        doc: "The name of the stream."
      ],
      stream_id: [
        type: :any,
        default_doc: "the `:stream` name",
        doc: """
        The identifier every call uses. Give each queue its own to open one
        stream twice.
        """
      ],
      service: [
        type: {:custom, &service/1, "a module implementing `Convoy.Service`"},
        default: Convoy.Services.Kinesis,
        doc: """
        The module that does the work. `Convoy.Services.Memory` runs without
        any Kinesis, for tests. A service written for Convoy 0.1 (the four
        callbacks `describe_stream/1`, `get_iterator/3`, `get_records/2` and
        `put_records/2`) runs through `Convoy.Services.Legacy`.
        """
      ],
      service_options: [
        type: :keyword,
        default: [],
        doc: """
        Options of the service itself. For example `shards:` of
        `Convoy.Services.Memory`.
        """
      ],
      batch_timeout: [
        type: {:integer, 0, :infinity},
        unit: :ms,
        default: 5000,
        doc: """
        How long a record may wait in the buffer for its batch; `0` disables
        batching. A full request (500 records or 5 MiB) goes at once.
        """
      ],
      poll_interval: [
        type: {:or, [{:in, [nil]}, {:integer, 1, :infinity}]},
        unit: :ms,
        default: nil,
        doc: """
        The time between polls that found no new records; `nil` disables
        polling. Without polling, records are read only with
        `Convoy.Queue.get/2`. Polling starts when a handler is attached and
        stops when the last one is detached.
        """
      ],
      iterator_type: [
        type:
          {:custom, &iterator_type/1,
           "`:latest`, `:trim_horizon`, `{:at_sequence_number, s}`, " <>
             "`{:after_sequence_number, s}` or `{:at_timestamp, %DateTime{}}`; " <>
             "`s` a sequence number or a map of shard id to sequence number"},
        default: :latest,
        doc: """
        Where a shard starts when it has no checkpoint. `:latest` means
        "records that arrive after the queue first started": each open shard
        is pinned to that time as soon as the shard list is known, and the pin
        is stored in the checkpoint store as the shard's first checkpoint, so
        detaching and re-attaching, or a restart of the consumer or of the
        whole queue, leaves no gap. Closed shards that nobody read are skipped.

        A sequence number belongs to one shard, so `s` is best a map of shard
        id to sequence number (what a store of your own holds); shards absent
        from the map start at their oldest record (TRIM_HORIZON), so nothing
        is skipped. A single sequence number is tried on every shard: the shard
        it belongs to starts there, and the others, which Kinesis refuses it
        for, start at their oldest record (kinesis-mock accepts it on every
        shard: use a map there).

        As the KCL does, a shard created by resharding whose parent this queue
        read (the parent has a checkpoint) starts at its oldest record, after
        its parent ended; any other shard without a checkpoint starts at
        `iterator_type`. `{:at_timestamp, t}` applies to every shard without a
        checkpoint, children included.
        """
      ],
      kinesis: [
        type: {:custom, &kinesis/1, "a keyword list"},
        default: [],
        doc: """
        Connection settings (see `Convoy.KinesisConfig`). They win over
        `config :convoy, :kinesis`, which wins over the AWS default chain.
        """
      ],
      checkpoint: [
        type:
          {:custom, &checkpoint/1,
           "a module implementing `Convoy.Checkpoint`, or `{module, options}`"},
        default: Convoy.Checkpoint.Memory,
        doc: """
        Where consumed positions are stored. The default survives restarts of
        the queue but not of the VM; `{Convoy.Checkpoint.File, dir: "..."}`
        survives both.
        """
      ],
      leases: [
        type: {:custom, &leases/1, "`nil`, or a keyword list with `:table`"},
        default: nil,
        doc: """
        Shares the shards with other nodes through a KCL 2.x lease table in
        DynamoDB; `nil` reads every shard here. See `Convoy.Leases`. Keys: `:table` (required: the table, which
        the KCL names after the application; created on demand if missing),
        `:worker_id` (this node's name in the table; by default unique per
        node and run), `:failover` (ms without renewal after which a lease
        may be taken; default `10_000`; leases are renewed every third of
        it), `:take_interval` (ms between lease-taking rounds; default
        `:failover`), and DynamoDB connection settings (`:endpoint_url`,
        `:region`, `:access_key_id`, `:secret_access_key`, `:session_token`,
        `:profile`, `:request_timeout`), each defaulting to the `:kinesis`
        one. With leases, checkpoints live in the lease table and
        `:checkpoint` is not used.
        """
      ],
      max_in_flight: [
        type: {:integer, 1, 256},
        default: 8,
        doc: """
        PutRecords requests in flight at once. Records of one partition key
        always share a request pipeline, so their order holds.
        """
      ],
      ordering: [
        type: {:in, [:per_key, :relaxed]},
        default: :per_key,
        doc: """
        How records of one partition key keep their `put` order. `:per_key`
        stores them in that order even when Kinesis rejects one entry of a
        request and stores a later one: a request carries each key in one
        Kinesis record at most (one record, or one aggregated record), and
        the key's next records wait for the next request. `:relaxed` fills
        requests in arrival order, which is faster when few keys carry many
        records, but a retried record may be stored after later records of
        its key. See "Ordering" in the README.
        """
      ],
      max_buffered_records: [
        type: {:integer, 1, :infinity},
        default: 100_000,
        doc: """
        Records accepted but not yet acknowledged, at most; past it `put`
        returns `{:error, :overloaded}`.
        """
      ],
      max_buffered_bytes: [
        type: {:integer, 1, :infinity},
        unit: :bytes,
        default: 64 * @mib,
        doc: "The same bound as `:max_buffered_records`, in bytes."
      ],
      max_record_bytes: [
        type: {:integer, 1, 10 * @mib},
        unit: :bytes,
        default: @mib,
        doc: """
        The largest record (data plus partition key). The default is the
        Kinesis limit; raise it for streams whose limit was raised.
        """
      ],
      max_retries: [
        type: {:integer, 0, :infinity},
        default: 10,
        doc: "Retries of a rejected record before it fails."
      ],
      retry_deadline: [
        type: {:integer, 1, :infinity},
        unit: :ms,
        default: 60_000,
        doc: "How long after its first attempt a record stops being retried."
      ],
      retry_backoff: [
        type: {:integer, 1, :infinity},
        unit: :ms,
        default: 100,
        doc: """
        The wait before the first retry, doubling each time. Each wait is
        drawn between half of it and all of it (jitter), up to
        `:max_backoff`. Shard pollers back off the same way after an error.
        """
      ],
      max_backoff: [
        type: {:integer, 1, :infinity},
        unit: :ms,
        default: 5000,
        doc: "The longest wait between retries."
      ],
      on_failure: [
        type: {:custom, &on_failure/1, "`nil`, a pid, a registered name or a 1-arity function"},
        default: nil,
        doc: """
        Who is told about records that finally failed; they are logged and
        counted either way. A function is called with `%{partition_key: k,
        data: d, reason: r}`; a pid or registered name is sent
        `{:convoy_put_failed, stream_id, [failure]}`.
        """
      ],
      aggregation: [
        type: :boolean,
        default: false,
        doc: """
        Packs records into KPL aggregated records, many user records bound for
        one shard in one Kinesis record. Compatible with the AWS KPL and KCL;
        Convoy's consumer unpacks them transparently.
        """
      ],
      aggregation_max_bytes: [
        type: {:integer, @kib, :infinity},
        unit: :bytes,
        default: 50 * @kib,
        doc: """
        The largest aggregated record, at most `:max_record_bytes`. The KPL
        uses the same default.
        """
      ],
      shutdown: [
        type: {:integer, 1, :infinity},
        unit: :ms,
        default: 30_000,
        doc: """
        How long the queue has, when it stops, to send what it buffered.
        Records still unsent then take the failure path.
        """
      ],
      consumer: [
        type:
          {:custom, &consumer/1,
           "`:polling` or `{:fan_out, name}` with `name` 1..128 of `[a-zA-Z0-9_.-]`"},
        default: :polling,
        doc: """
        How shards are read. `:polling` calls GetRecords, sharing each
        shard's 5 reads/s and 2 MB/s with every reader of the stream.
        `{:fan_out, name}` is enhanced fan-out (Kinesis service only): the
        stream consumer `name` (registered if missing, reused if present)
        gets 2 MB/s per shard of its own, pushed over SubscribeToShard, and
        reading starts with the first handler whatever `:poll_interval` is.
        Kinesis bills fan-out consumers by the hour; remove one with
        `Convoy.Services.Kinesis.deregister_consumer/3`.
        """
      ],
      poll_limit: [
        type: {:integer, 1, 10_000},
        default: 10_000,
        doc: "The most records one GetRecords call returns."
      ],
      shard_refresh_interval: [
        type: {:integer, 1, :infinity},
        unit: :ms,
        default: 60_000,
        doc: "The time between ListShards calls that discover new shards."
      ],
      handlers: [
        type:
          {:custom, &handlers/1,
           "a list of `{id, handler, config}` or `{id, handler, config, opts}`"},
        default: [],
        doc: """
        Handlers attached as the queue starts, and again whenever its
        supervisor restarts it. `handler`, `config` and `opts` are those of
        `Convoy.Queue.attach_handler/5`; ids must be unique.
        """
      ]
    ]
  end

  @doc false
  @spec handler_schema() :: [{atom, keyword}]
  def handler_schema do
    [
      partition_keys: [
        type:
          {:custom, &partition_keys/1,
           "`nil`, a string, a list of strings or a 1-arity predicate on the key"},
        default: nil,
        doc: "Only records with these partition keys; `nil` means every record."
      ],
      on_error: [
        type:
          {:custom, &on_error/1,
           "`:detach`, `:halt`, `{:dead_letter, fun}`, `:retry`, `{:retry, n}` or " <>
             "`{:retry, n, then}`, with `n` a positive integer and `then` one of the first three"},
        default: :detach,
        doc: """
        What happens when a handler fails on a record: a function handler
        raises, throws or exits, a pid handler nacks the batch, acks only a
        part of it or misses its `:ack_timeout`. `:detach` logs the error
        with its stacktrace and detaches the handler, as the original Convoy
        did; the other handlers go on. `:halt` stops the shard at the record,
        with no checkpoint past it, logs it and emits `[:convoy, :shard,
        :halted]`; the record is tried again when the handlers change, or read
        again when the queue restarts. `{:dead_letter, fun}` calls
        `fun.(record, %{handler_id:, kind:, reason:, attempts:})` and goes on
        (if `fun` fails too, the shard halts). `:retry` tries again with
        backoff (100 ms doubling up to 5 s) until the handler succeeds;
        `{:retry, n}` makes `n` attempts in all, then detaches; `{:retry, n,
        then}` does `then` after the last attempt. The shard waits for the
        retries, and detaching the handler meanwhile lets the batch go on. A
        pid handler that dies is detached, whatever its policy.
        """
      ],
      ack_timeout: [
        type: {:or, [{:integer, 1, :infinity}, {:in, [:infinity]}]},
        unit: :ms,
        default: :infinity,
        doc: "How long a pid handler has to ack a batch before it is detached."
      ],
      replace: [
        type: :boolean,
        default: false,
        doc: """
        Whether a handler already attached under the same id is replaced
        (`true`, what `attach_handler/4` and `attach/4` do) or the call
        answers `{:error, :already_exists}` (`false`).
        """
      ]
    ]
  end

  @doc false
  # Every option with its default (`nil` for `:stream` and `:stream_id`), as
  # the schema gives it: for code that needs a default without validating.
  @spec defaults() :: keyword
  def defaults, do: for({key, spec} <- schema(), do: {key, spec[:default]})

  ## Validation

  @doc false
  # Validates and normalizes the options of `Convoy.Queue.start_link/1`;
  # raises ArgumentError naming the bad key and value.
  @spec validate!(term) :: keyword
  def validate!(options) do
    unless is_list(options) and Keyword.keyword?(options) do
      raise ArgumentError, "Convoy.Queue options must be a keyword list, got: #{inspect(options)}"
    end

    options =
      case validate(schema(), options) do
        {:ok, options} ->
          options

        {:error, {:unknown, unknown}} ->
          raise ArgumentError,
                "unknown Convoy.Queue options #{inspect(unknown)}; known options: " <>
                  inspect(Keyword.keys(schema()))

        {:error, {:required, key}} ->
          raise ArgumentError, "Convoy.Queue option #{inspect(key)} is required"

        {:error, {:invalid, key, _value, message}} ->
          raise ArgumentError, "invalid Convoy.Queue option #{inspect(key)}: #{message}"
      end

    options
    |> Keyword.update!(:stream_id, &if(is_nil(&1), do: options[:stream], else: &1))
    |> legacy_service()
    |> check_aggregation_size!()
    |> check_fan_out_service!()
    |> check_kinesis_stream_name!()
  end

  # Kinesis takes stream names of [a-zA-Z0-9_.-] only: with another name
  # every call would fail at run time. Other services take any name.
  defp check_kinesis_stream_name!(options) do
    stream = options[:stream]

    if options[:service] == Convoy.Services.Kinesis and not (stream =~ ~r/\A[a-zA-Z0-9_.-]+\z/) do
      raise ArgumentError,
            "invalid Convoy.Queue option :stream: a Kinesis stream name is 1..128 of " <>
              "[a-zA-Z0-9_.-], got: #{inspect(stream)}"
    end

    options
  end

  defp check_fan_out_service!(options) do
    service = options[:service]

    case options[:consumer] do
      {:fan_out, _} when service != Convoy.Services.Kinesis ->
        raise ArgumentError,
              "invalid Convoy.Queue option :consumer: enhanced fan-out needs " <>
                "service Convoy.Services.Kinesis, got: #{inspect(service)}"

      _ ->
        options
    end
  end

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
        case validate(handler_schema(), opts) do
          {:ok, opts} -> {:ok, opts}
          {:error, {:unknown, unknown}} -> {:error, {:unknown_options, unknown}}
          {:error, {:invalid, key, value, _message}} -> {:error, {:"invalid_#{key}", value}}
        end
    end
  end

  defp validate(schema, options) do
    defaults = for {key, spec} <- schema, do: {key, spec[:default]}

    with {:ok, options} <- Keyword.validate(options, defaults) do
      Enum.reduce_while(schema, {:ok, options}, fn {key, spec}, {:ok, options} ->
        case check(options[key], spec) do
          {:ok, value} -> {:cont, {:ok, Keyword.put(options, key, value)}}
          :required -> {:halt, {:error, {:required, key}}}
          {:error, message} -> {:halt, {:error, {:invalid, key, options[key], message}}}
        end
      end)
    else
      {:error, unknown} -> {:error, {:unknown, unknown}}
    end
  end

  defp check(nil, spec) do
    if spec[:required], do: :required, else: check(nil, spec[:type], spec)
  end

  defp check(value, spec), do: check(value, spec[:type], spec)

  defp check(value, type, spec) do
    case conform(type, value) do
      {:ok, value} ->
        {:ok, value}

      {:error, message} ->
        {:error, message}

      :error ->
        {:error,
         "expected #{plain(describe(type))}#{unit_suffix(spec[:unit])}, got: #{inspect(value)}"}
    end
  end

  defp conform(:any, value), do: {:ok, value}
  defp conform(:boolean, value), do: if(is_boolean(value), do: {:ok, value}, else: :error)

  defp conform(:keyword, value),
    do: if(is_list(value) and Keyword.keyword?(value), do: {:ok, value}, else: :error)

  defp conform({:integer, min, max}, value)
       when is_integer(value) and value >= min and (max == :infinity or value <= max),
       do: {:ok, value}

  defp conform({:integer, _min, _max}, _value), do: :error
  defp conform({:in, values}, value), do: if(value in values, do: {:ok, value}, else: :error)

  defp conform({:or, types}, value) do
    Enum.find_value(types, :error, fn type ->
      case conform(type, value) do
        {:ok, value} -> {:ok, value}
        _ -> nil
      end
    end)
  end

  defp conform({:custom, fun, _description}, value), do: fun.(value)

  defp consumer(:polling), do: {:ok, :polling}

  defp consumer({:fan_out, name}) when is_binary(name) do
    if name =~ ~r/\A[a-zA-Z0-9_.-]{1,128}\z/, do: {:ok, {:fan_out, name}}, else: :error
  end

  defp consumer(_), do: :error

  # A Convoy 0.1 service runs through the adapter, which finds the module in
  # its service options; the result passes this check again unchanged.
  defp legacy_service(options) do
    module = options[:service]

    if Convoy.Services.Legacy.legacy?(module) and not current_service?(module) do
      options
      |> Keyword.put(:service, Convoy.Services.Legacy)
      |> Keyword.put(:service_options, [{:module, module} | options[:service_options]])
    else
      options
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

  ## Custom types of the queue options

  defp stream(stream) when is_binary(stream) and stream != "" and byte_size(stream) <= 128,
    do: {:ok, stream}

  defp stream(stream) when is_atom(stream) and stream not in [nil, true, false],
    do: stream(Atom.to_string(stream))

  defp stream(_), do: :error

  defp service(module) do
    if current_service?(module) or Convoy.Services.Legacy.legacy?(module),
      do: {:ok, module},
      else: :error
  end

  defp current_service?(module) do
    is_atom(module) and Code.ensure_loaded?(module) and
      function_exported?(module, :child_spec, 1) and function_exported?(module, :put, 4)
  end

  defp iterator_type(:latest), do: {:ok, :latest}
  defp iterator_type(:trim_horizon), do: {:ok, :trim_horizon}

  defp iterator_type({kind, sequences} = type)
       when kind in [:at_sequence_number, :after_sequence_number] and is_map(sequences) do
    if sequences != %{} and
         Enum.all?(sequences, fn {shard_id, s} ->
           is_binary(shard_id) and match?({:ok, _}, sequence(s, type))
         end),
       do: {:ok, type},
       else: :error
  end

  defp iterator_type({:at_sequence_number, s} = type), do: sequence(s, type)
  defp iterator_type({:after_sequence_number, s} = type), do: sequence(s, type)
  defp iterator_type({:at_timestamp, %DateTime{}} = type), do: {:ok, type}
  defp iterator_type(_), do: :error

  defp sequence(s, type) do
    if is_binary(s) and String.match?(s, ~r/^\d+$/), do: {:ok, type}, else: :error
  end

  # Resolved here, so the queue starts with its final settings; an already
  # resolved config (the second pass, in start_link/1) stays as it is.
  defp kinesis(%Convoy.KinesisConfig{} = config), do: {:ok, config}

  defp kinesis(options) do
    if is_list(options) and Keyword.keyword?(options),
      do: {:ok, Convoy.KinesisConfig.resolve(options)},
      else: :error
  end

  defp checkpoint({module, opts}) when is_atom(module) and is_list(opts) do
    if checkpoint_module?(module), do: {:ok, {module, opts}}, else: :error
  end

  defp checkpoint(module) when is_atom(module) do
    if checkpoint_module?(module), do: {:ok, {module, []}}, else: :error
  end

  defp checkpoint(_), do: :error

  defp checkpoint_module?(module),
    do: Code.ensure_loaded?(module) and function_exported?(module, :init, 1)

  @lease_connection [
    :endpoint_url,
    :region,
    :access_key_id,
    :secret_access_key,
    :session_token,
    :profile,
    :request_timeout
  ]

  @doc false
  def lease_connection_keys, do: @lease_connection

  defp leases(nil), do: {:ok, nil}

  defp leases(options) when is_list(options) do
    with true <-
           Keyword.keyword?(options) ||
             {:error, "expected a keyword list, got: #{inspect(options)}"},
         [] <-
           Keyword.keys(options) --
             [:table, :worker_id, :failover, :take_interval | @lease_connection],
         table when is_binary(table) <- options[:table] || {:error, "`:table` is required"},
         true <-
           Regex.match?(~r/^[A-Za-z0-9_.-]{3,255}$/, table) ||
             {:error,
              "`:table` must be a DynamoDB table name (3..255 of A-Z a-z 0-9 _ . -), got: #{inspect(table)}"},
         worker_id = options[:worker_id],
         true <-
           is_nil(worker_id) or (is_binary(worker_id) and worker_id != "") ||
             {:error, "`:worker_id` must be a non-empty string, got: #{inspect(worker_id)}"},
         failover = Keyword.get(options, :failover, 10_000),
         true <-
           (is_integer(failover) and failover >= 300) ||
             {:error,
              "`:failover` must be an integer of at least 300 (ms), got: #{inspect(failover)}"},
         take = options[:take_interval],
         true <-
           is_nil(take) or (is_integer(take) and take > 0) ||
             {:error, "`:take_interval` must be a positive integer (ms), got: #{inspect(take)}"},
         :ok <- lease_connection(Keyword.take(options, @lease_connection)) do
      {:ok, Keyword.merge(options, table: table, failover: failover)}
    else
      {:error, message} -> {:error, message}
      unknown when is_list(unknown) -> {:error, "unknown keys #{inspect(unknown)}"}
      _ -> :error
    end
  end

  defp leases(_), do: :error

  defp lease_connection(connection) do
    Enum.reduce_while(connection, :ok, fn
      {:request_timeout, ms}, :ok when is_integer(ms) and ms > 0 ->
        {:cont, :ok}

      {key, value}, :ok when key != :request_timeout and is_binary(value) and value != "" ->
        {:cont, :ok}

      {key, value}, :ok ->
        shown =
          if key in [:access_key_id, :secret_access_key, :session_token],
            do: "",
            else: ", got: #{inspect(value)}"

        {:halt,
         {:error,
          "`#{inspect(key)}` must be #{if key == :request_timeout, do: "a positive integer (ms)", else: "a non-empty string"}#{shown}"}}
    end)
  end

  defp on_failure(target)
       when is_nil(target) or is_pid(target) or is_atom(target) or is_function(target, 1),
       do: {:ok, target}

  defp on_failure(_), do: :error

  defp handlers(handlers) when is_list(handlers) do
    handlers =
      Enum.map(handlers, fn
        {id, handler, config} -> start_handler(id, handler, config, [])
        {id, handler, config, opts} -> start_handler(id, handler, config, opts)
        other -> {:error, "bad entry #{inspect(other)}"}
      end)

    ids = for {id, _, _, _} <- handlers, do: id

    cond do
      error = Enum.find(handlers, &match?({:error, _}, &1)) -> error
      length(Enum.uniq(ids)) != length(ids) -> {:error, "duplicate ids in #{inspect(ids)}"}
      true -> {:ok, handlers}
    end
  end

  defp handlers(_), do: :error

  defp start_handler(id, handler, config, opts) do
    case handler(handler, opts) do
      {:ok, opts} -> {id, handler, config, opts}
      {:error, reason} -> {:error, "#{inspect(id)}: #{inspect(reason)}"}
    end
  end

  ## Custom types of the handler options

  defp partition_keys(keys)
       when is_nil(keys) or is_binary(keys) or is_function(keys, 1),
       do: {:ok, keys}

  defp partition_keys(keys) when is_list(keys) do
    if Enum.all?(keys, &is_binary/1), do: {:ok, keys}, else: :error
  end

  defp partition_keys(_), do: :error

  defp on_error(on_error) when on_error in [:detach, :retry], do: {:ok, on_error}
  defp on_error({:retry, n} = on_error) when is_integer(n) and n > 0, do: {:ok, on_error}

  defp on_error({:retry, n, then} = on_error) when is_integer(n) and n > 0 do
    if final_action?(then), do: {:ok, on_error}, else: :error
  end

  defp on_error(on_error) do
    if final_action?(on_error), do: {:ok, on_error}, else: :error
  end

  defp final_action?(action) when action in [:detach, :halt], do: true
  defp final_action?({:dead_letter, fun}) when is_function(fun, 2), do: true
  defp final_action?(_), do: false

  ## Documentation

  @doc false
  # The `## Options` list of `Convoy.Queue.start_link/1`, in Markdown.
  @spec docs() :: String.t()
  def docs, do: render_docs(schema())

  @doc false
  # The same list for the options of `Convoy.Queue.attach_handler/5`.
  @spec handler_docs() :: String.t()
  def handler_docs, do: render_docs(handler_schema())

  @doc false
  # The options table of README.md (test/convoy/options_schema_test.exs
  # checks that README.md has it).
  @spec readme_table() :: String.t()
  def readme_table do
    rows =
      for {key, spec} <- schema() do
        cells = [
          "`#{key}`",
          describe(spec[:type]) <> unit_doc(spec[:unit]),
          default_doc(spec),
          summary(spec)
        ]

        "| " <> Enum.map_join(cells, " | ", &String.replace(&1, "|", "\\|")) <> " |\n"
      end

    "| option | type | default | meaning |\n|---|---|---|---|\n" <> Enum.join(rows)
  end

  # The first sentence of an option's doc.
  defp summary(spec) do
    text = squish(spec[:doc])

    case Regex.run(~r/^.*?[.!?](?=\s|$)/, text) do
      [sentence] -> sentence
      nil -> text
    end
  end

  defp render_docs(schema) do
    Enum.map_join(schema, fn {key, spec} ->
      type = "(#{describe(spec[:type])}#{unit_doc(spec[:unit])})"
      required = if spec[:required], do: "Required. ", else: ""
      default = if spec[:required], do: "", else: " Defaults to #{default_doc(spec)}."

      wrap("* `#{inspect(key)}` #{type} - #{required}#{squish(spec[:doc])}#{default}", 80)
    end)
  end

  defp default_doc(spec) do
    cond do
      spec[:required] -> "required"
      spec[:default_doc] -> spec[:default_doc]
      true -> format_value(spec[:default], spec[:unit])
    end
  end

  defp format_value(value, :bytes) when is_integer(value) and value >= @kib do
    "#{format_value(value, nil)} (#{format_bytes(value)})"
  end

  defp format_value(value, _unit) when is_integer(value) and value >= 10_000 do
    digits = value |> Integer.to_string() |> String.reverse()
    grouped = Regex.scan(~r/\d{1,3}/, digits) |> Enum.map_join("_", &hd/1)
    "`#{String.reverse(grouped)}`"
  end

  defp format_value(value, _unit), do: "`#{inspect(value)}`"

  defp format_bytes(n) when rem(n, @mib) == 0, do: "#{div(n, @mib)} MiB"
  defp format_bytes(n) when rem(n, @kib) == 0, do: "#{div(n, @kib)} KiB"
  defp format_bytes(n), do: "#{n} bytes"

  # A type in words, in Markdown.
  defp describe(:any), do: "any term"
  defp describe(:boolean), do: "a boolean"
  defp describe(:keyword), do: "a keyword list"
  defp describe({:integer, 0, :infinity}), do: "a non-negative integer"
  defp describe({:integer, 1, :infinity}), do: "a positive integer"
  defp describe({:integer, min, :infinity}), do: "an integer of at least #{bound(min)}"
  defp describe({:integer, min, max}), do: "an integer in #{bound(min)}..#{bound(max)}"
  defp describe({:in, [value]}), do: "`#{inspect(value)}`"

  defp describe({:in, values}),
    do: "one of " <> Enum.map_join(values, ", ", &"`#{inspect(&1)}`")

  defp describe({:or, types}) do
    {init, [last]} = types |> Enum.map(&describe/1) |> Enum.split(-1)
    Enum.join(init, ", ") <> " or " <> last
  end

  defp describe({:custom, _fun, description}), do: description

  # Byte bounds read better in KiB and MiB.
  defp bound(n) when n >= @kib and rem(n, @kib) == 0, do: format_bytes(n)
  defp bound(n), do: Integer.to_string(n)

  defp unit_suffix(nil), do: ""
  defp unit_suffix(unit), do: " (#{unit})"

  defp unit_doc(nil), do: ""
  defp unit_doc(unit), do: ", in #{unit}"

  # Markdown to plain text, for error messages.
  defp plain(text), do: String.replace(text, "`", "")

  defp squish(text), do: text |> String.split() |> Enum.join(" ")

  # Wraps a Markdown list item at `width` columns, continuation lines
  # indented under its text, never breaking inside a code span nor before a
  # word that would start a block at the beginning of a line (`-`, `1.`).
  defp wrap(text, width) do
    words =
      ~r/(?:[^\s`]|`[^`]*`|`)+/
      |> Regex.scan(text)
      |> Enum.map(&hd/1)
      |> Enum.chunk_while(nil, &glue/2, &{:cont, &1, nil})

    {lines, last} =
      Enum.reduce(tl(words), {[], "  " <> hd(words)}, fn word, {lines, line} ->
        if String.length(line) + 1 + String.length(word) <= width,
          do: {lines, line <> " " <> word},
          else: {[line | lines], "    " <> word}
      end)

    [last | lines] |> Enum.reverse() |> Enum.map_join(&(&1 <> "\n"))
  end

  defp glue(word, nil), do: {:cont, word}

  defp glue(word, previous) do
    if word =~ ~r/^(#+|[-*+>]|\d+[.)])$/,
      do: {:cont, previous <> " " <> word},
      else: {:cont, previous, word}
  end
end
