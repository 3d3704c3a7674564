using System.Text.Json;

namespace LocalVllm.Engine;

/// <summary>
/// Speculative decoding (vLLM's <c>speculative_config</c>), by prompt lookup: each step, a decoding sequence also
/// computes up to <see cref="NumSpeculativeTokens"/> tokens proposed from its own earlier tokens (the tokens that
/// followed the last time its final <see cref="PromptLookupMax"/> .. <see cref="PromptLookupMin"/> tokens appeared) and
/// keeps as many as the model agrees with, plus the model's next token: a greedy request's output is the same as
/// without it, and a sampled request's tokens have the same distribution (each draft stands with the probability the
/// model gives it). Where the text repeats what the context holds, several tokens come out of one forward pass.
/// Greedy requests under a structured-output constraint speculate too (drafts cut where the grammar refuses them or
/// forces what follows). Requests with penalties, bad words, log-probabilities or a seed, and sampled ones under a
/// constraint, decode as usual.
/// </summary>
public sealed record SpeculativeConfig
{
    /// <summary>The proposer: <c>"ngram"</c> (prompt lookup), the one served here.</summary>
    public string Method { get; init; } = "ngram";
    /// <summary>Draft tokens proposed per step, at most.</summary>
    public int NumSpeculativeTokens { get; init; } = 4;
    /// <summary>The longest suffix looked up.</summary>
    public int PromptLookupMax { get; init; } = 4;
    /// <summary>The shortest suffix looked up (shorter ones match more often, and more often wrongly).</summary>
    public int PromptLookupMin { get; init; } = 2;
    /// <summary>
    /// No drafts while this many sequences or more are running (vLLM's <c>disable_by_batch_size</c>): a large batch
    /// keeps the cores busy, so extra positions cost more than the steps they save. Null (the default): always.
    /// </summary>
    public int? DisableByBatchSize { get; init; }

    internal void Validate()
    {
        if (Method != "ngram")
            throw new ArgumentException($"Speculative method '{Method}' is not served; \"ngram\" (prompt lookup) is.", nameof(Method));
        if (NumSpeculativeTokens is < 1 or > 64)
            throw new ArgumentOutOfRangeException(nameof(NumSpeculativeTokens), NumSpeculativeTokens, "NumSpeculativeTokens must be between 1 and 64.");
        if (DisableByBatchSize is < 2)
            throw new ArgumentOutOfRangeException(nameof(DisableByBatchSize), DisableByBatchSize, "DisableByBatchSize must be at least 2 (or unset).");
        if (PromptLookupMin < 1 || PromptLookupMax < PromptLookupMin)
            throw new ArgumentException($"PromptLookupMin = {PromptLookupMin} and PromptLookupMax = {PromptLookupMax}: need 1 <= min <= max.", nameof(PromptLookupMin));
    }

    /// <summary>
    /// Reads vLLM's JSON form (<c>{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    /// "prompt_lookup_min": 2}</c>); what it leaves out keeps this type's defaults, except that a lone
    /// <c>prompt_lookup_max</c> below the default minimum lowers the minimum with it.
    /// </summary>
    public static SpeculativeConfig Parse(string json)
    {
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json);
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"The speculative config is not valid JSON: {e.Message}", nameof(json));
        }
        using var _ = doc;
        if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new ArgumentException("The speculative config must be a JSON object.", nameof(json));
        var c = new SpeculativeConfig();
        int? min = null, max = null;
        foreach (var p in doc.RootElement.EnumerateObject())
        {
            int Int() => p.Value.TryGetInt32(out var v) ? v : throw new ArgumentException($"Speculative config '{p.Name}' must be an integer.", nameof(json));
            switch (p.Name)
            {
                case "method": c = c with { Method = p.Value.GetString() ?? "" }; break;
                case "num_speculative_tokens": c = c with { NumSpeculativeTokens = Int() }; break;
                case "prompt_lookup_max": max = Int(); break;
                case "prompt_lookup_min": min = Int(); break;
                case "disable_by_batch_size": c = c with { DisableByBatchSize = Int() }; break;
                default: throw new ArgumentException($"Speculative config key '{p.Name}' is not served; method, num_speculative_tokens, prompt_lookup_max, prompt_lookup_min and disable_by_batch_size are.", nameof(json));
            }
        }
        if (max is int m) c = c with { PromptLookupMax = m, PromptLookupMin = min ?? Math.Min(c.PromptLookupMin, m) };
        else if (min is int n) c = c with { PromptLookupMin = n, PromptLookupMax = Math.Max(c.PromptLookupMax, n) };
        c.Validate();
        return c;
    }
}
