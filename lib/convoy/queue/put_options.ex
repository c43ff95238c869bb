defmodule Convoy.Queue.PutOptions do
  @moduledoc false
  # The options of `Convoy.Queue.put/4`, checked the same way by every service.

  @spec parse(term) :: {:ok, String.t() | nil, timeout | nil} | {:error, term}
  # No options: the common case, on every put.
  def parse([]), do: {:ok, nil, nil}

  def parse(opts) when is_list(opts) do
    if Keyword.keyword?(opts) do
      case Keyword.split(opts, [:explicit_hash_key, :await]) do
        {known, []} -> check_await(known[:explicit_hash_key], known[:await])
        {_, unknown} -> {:error, {:unknown_options, Keyword.keys(unknown)}}
      end
    else
      {:error, {:invalid_options, opts}}
    end
  end

  def parse(opts), do: {:error, {:invalid_options, opts}}

  defp check_await(hash_key, await)
       when is_nil(await) or await == :infinity or (is_integer(await) and await >= 0),
       do: {:ok, hash_key, await}

  defp check_await(_hash_key, await), do: {:error, {:invalid_await, await}}
end
