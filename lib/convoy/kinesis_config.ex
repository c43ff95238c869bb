defmodule Convoy.KinesisConfig do
  @moduledoc """
  Kinesis connection settings.

  The same keys are accepted in two places; the queue's own `kinesis:` option
  wins over the application config, which wins over the AWS default chain
  (environment variables, shared profile, container or instance role):

      config :convoy, :kinesis,
        endpoint_url: "http://127.0.0.1:4567",   # omit for real AWS
        region: "us-east-1",
        access_key_id: "...",
        secret_access_key: "...",
        session_token: nil,
        profile: nil

      {Convoy.Queue, stream: "events", kinesis: [endpoint_url: "http://127.0.0.1:4567"]}

  Keys:

    * `:endpoint_url` - a Kinesis-compatible endpoint such as a local emulator
    * `:region` - the AWS region; `"us-east-1"` when an `endpoint_url` is set and no region is
    * `:access_key_id`, `:secret_access_key`, `:session_token` - static credentials
    * `:profile` - a profile from `~/.aws/config`
    * `:request_timeout` - ms allowed for one API call (default `10_000`)

  Secrets never show up in `inspect/1`, logs or error messages: this struct's
  `Inspect` implementation redacts them.

  ## Convoy 0.1's ExAws configuration

  When there is no `config :convoy, :kinesis` at all, the configuration the
  original Convoy read through ExAws is honoured instead, so an application
  whose dev config points at a local Kinesis keeps talking to it:

      config :ex_aws,
        access_key_id: [{:system, "AWS_ACCESS_KEY_ID"}, :instance_role],
        secret_access_key: [{:system, "AWS_SECRET_ACCESS_KEY"}, :instance_role],
        region: "us-east-1",
        kinesis: %{
          host: "localhost",
          port: 4567,
          scheme: "http://",
          access_key_id: [{:system, "KINESIS_AWS_ACCESS_KEY_ID"}, :instance_role],
          secret_access_key: [{:system, "KINESIS_SECRET_ACCESS_KEY"}, :instance_role]
        }

  Each key is looked up under `:kinesis` first (a map or a keyword list),
  then at the top level of `:ex_aws`, as ExAws did:

    * `:host`, `:port` and `:scheme` (`"http://"`, `"https://"`, `"http"` or
      `"https"`; `"https://"` when omitted) make the `:endpoint_url`; without
      a `:host` the endpoint is AWS' own for the region;
    * `:region` is the region;
    * `:access_key_id`, `:secret_access_key` and `:security_token` (the
      session token) take ExAws' forms: a string, `{:system, "VAR"}` (the
      variable's value, skipped when unset or empty), `:instance_role` (no
      static key: the AWS default chain, which ends with the instance role),
      `{:awscli, "profile", _ttl}` (that profile), or a list of these tried in
      order.

  Precedence, highest first: the queue's `kinesis:` option, then `config
  :convoy, :kinesis` when it exists, else the ExAws configuration above, then
  the AWS default chain for whatever is still unset. A `config :convoy,
  :kinesis` replaces the ExAws configuration as a whole (they are not merged
  key by key). A `:host` that cannot make a valid endpoint raises
  `ArgumentError` rather than being ignored, so a local endpoint configured
  the old way never falls back to real AWS.

  ## Example

      iex> config = Convoy.KinesisConfig.resolve(secret_access_key: "s3cr3t", region: "eu-west-1")
      iex> config.region
      "eu-west-1"
      iex> inspect(config) =~ "s3cr3t"
      false
  """

  @keys [
    :endpoint_url,
    :region,
    :access_key_id,
    :secret_access_key,
    :session_token,
    :profile,
    :request_timeout
  ]
  @secrets [:access_key_id, :secret_access_key, :session_token]

  defstruct endpoint_url: nil,
            region: nil,
            access_key_id: nil,
            secret_access_key: nil,
            session_token: nil,
            profile: nil,
            request_timeout: 10_000

  @type t :: %__MODULE__{
          endpoint_url: String.t() | nil,
          region: String.t() | nil,
          access_key_id: String.t() | nil,
          secret_access_key: String.t() | nil,
          session_token: String.t() | nil,
          profile: String.t() | nil,
          request_timeout: pos_integer
        }

  @doc """
  Merges the queue's `kinesis:` options over `config :convoy, :kinesis` and
  validates the result. Raises `ArgumentError` naming a bad key or value.

  ## Example

      Convoy.KinesisConfig.resolve(endpoint_url: "http://127.0.0.1:4567")
  """
  @spec resolve(keyword) :: t
  def resolve(queue_options) do
    {app, where} =
      case Application.fetch_env(:convoy, :kinesis) do
        {:ok, app} -> {app, "config :convoy, :kinesis"}
        :error -> {from_ex_aws(), "config :ex_aws"}
      end

    merged =
      Keyword.merge(
        check_keys!(app, where),
        check_keys!(queue_options, "kinesis:")
      )

    config = struct!(__MODULE__, merged)

    for key <- [
          :endpoint_url,
          :region,
          :access_key_id,
          :secret_access_key,
          :session_token,
          :profile
        ] do
      value = Map.fetch!(config, key)

      unless is_nil(value) or (is_binary(value) and value != "") do
        raise ArgumentError,
              "invalid kinesis option #{inspect(key)}: expected a non-empty string or nil" <>
                if(key in @secrets, do: "", else: ", got: #{inspect(value)}")
      end
    end

    unless is_integer(config.request_timeout) and config.request_timeout > 0 do
      raise ArgumentError,
            "invalid kinesis option :request_timeout: expected a positive integer (ms), got: " <>
              inspect(config.request_timeout)
    end

    if is_nil(config.access_key_id) != is_nil(config.secret_access_key) do
      raise ArgumentError,
            "kinesis options :access_key_id and :secret_access_key must be given together"
    end

    if config.endpoint_url && is_nil(config.region) do
      %{config | region: "us-east-1"}
    else
      config
    end
  end

  @doc """
  The settings Convoy 0.1's ExAws configuration (`config :ex_aws`) gives, as
  keys of `config :convoy, :kinesis`; `[]` when there is none. See "Convoy
  0.1's ExAws configuration" above. Raises `ArgumentError` for a value ExAws
  would not have accepted either.

  ## Example

      Application.put_env(:ex_aws, :kinesis, %{host: "localhost", port: 4567, scheme: "http://"})
      Convoy.KinesisConfig.from_ex_aws()
      #=> [endpoint_url: "http://localhost:4567"]
  """
  @spec from_ex_aws() :: keyword
  def from_ex_aws do
    top = Application.get_all_env(:ex_aws)

    kinesis =
      case Keyword.get(top, :kinesis) do
        nil ->
          %{}

        map when is_map(map) ->
          map

        list when is_list(list) ->
          Map.new(list)

        other ->
          raise ArgumentError, "config :ex_aws, :kinesis must be a map, got: #{inspect(other)}"
      end

    get = fn key -> Map.get(kinesis, key, Keyword.get(top, key)) end

    [
      endpoint_url: ex_aws_endpoint(get.(:host), get.(:port), get.(:scheme)),
      region: ex_aws_string(get.(:region), :region),
      access_key_id: ex_aws_credential(get.(:access_key_id), :access_key_id),
      secret_access_key: ex_aws_credential(get.(:secret_access_key), :secret_access_key),
      session_token: ex_aws_credential(get.(:security_token), :security_token),
      profile: ex_aws_profile(get.(:access_key_id))
    ]
    |> Enum.reject(fn {_key, value} -> is_nil(value) end)
  end

  defp ex_aws_endpoint(nil, _port, _scheme), do: nil

  defp ex_aws_endpoint(host, port, scheme) do
    scheme =
      case scheme do
        nil -> "https://"
        s when s in ["http://", "https://"] -> s
        s when s in ["http", "https"] -> s <> "://"
        other -> raise ArgumentError, "invalid config :ex_aws kinesis :scheme #{inspect(other)}"
      end

    unless is_binary(host) and host != "" and not String.contains?(host, ["/", " "]) do
      raise ArgumentError, "invalid config :ex_aws kinesis :host #{inspect(host)}"
    end

    port =
      case port do
        nil ->
          ""

        p when is_integer(p) and p in 1..65_535 ->
          ":#{p}"

        p when is_binary(p) ->
          case Integer.parse(p) do
            {n, ""} when n in 1..65_535 -> ":#{n}"
            _ -> raise ArgumentError, "invalid config :ex_aws kinesis :port #{inspect(p)}"
          end

        other ->
          raise ArgumentError, "invalid config :ex_aws kinesis :port #{inspect(other)}"
      end

    scheme <> host <> port
  end

  defp ex_aws_string(nil, _key), do: nil
  defp ex_aws_string(value, _key) when is_binary(value), do: value

  defp ex_aws_string(value, key) do
    case ex_aws_credential(value, key) do
      nil -> nil
      string -> string
    end
  end

  # The first form of an ExAws credential setting that gives a value.
  defp ex_aws_credential(nil, _key), do: nil

  defp ex_aws_credential(forms, key) when is_list(forms),
    do: Enum.find_value(forms, &form(&1, key))

  defp ex_aws_credential(form, key), do: form(form, key)

  defp form(value, _key) when is_binary(value) and value != "", do: value

  defp form({:system, var}, _key) when is_binary(var) do
    case System.get_env(var) do
      value when is_binary(value) and value != "" -> value
      _ -> nil
    end
  end

  defp form(:instance_role, _key), do: nil
  defp form({:awscli, _profile, _ttl}, _key), do: nil
  defp form({:awscli, _profile}, _key), do: nil

  defp form(_other, key) do
    # The value is not shown: it may be a secret.
    raise ArgumentError,
          "invalid config :ex_aws #{inspect(key)}: expected a string, {:system, \"VAR\"}, " <>
            ":instance_role, {:awscli, profile, ttl} or a list of these"
  end

  # `{:awscli, profile, _}` names a profile, when no form before it gave a key.
  defp ex_aws_profile(forms) do
    forms
    |> List.wrap()
    |> Enum.reduce_while(nil, fn
      {:awscli, profile, _ttl}, nil when is_binary(profile) -> {:halt, profile}
      {:awscli, profile}, nil when is_binary(profile) -> {:halt, profile}
      form, nil -> if form(form, :access_key_id), do: {:halt, nil}, else: {:cont, nil}
    end)
  end

  defp check_keys!(options, where) do
    unless Keyword.keyword?(options) do
      raise ArgumentError, "#{where} must be a keyword list, got: #{inspect(options)}"
    end

    case Keyword.keys(options) -- @keys do
      [] ->
        options

      unknown ->
        raise ArgumentError,
              "unknown #{where} keys #{inspect(unknown)}; known keys: #{inspect(@keys)}"
    end
  end

  @doc false
  # The map the NIF decodes: the options under their own names
  # (`request_timeout` in ms on both sides).
  @spec to_native(t) :: map
  def to_native(%__MODULE__{} = config), do: Map.from_struct(config)

  defimpl Inspect do
    import Inspect.Algebra

    def inspect(config, opts) do
      shown =
        config
        |> Map.from_struct()
        |> Enum.map(fn
          {key, value}
          when key in [:access_key_id, :secret_access_key, :session_token] and not is_nil(value) ->
            {key, :redacted}

          pair ->
            pair
        end)

      concat(["#Convoy.KinesisConfig<", to_doc(shown, opts), ">"])
    end
  end
end
