using System.Text.Json.Nodes;
using LocalVllm.Engine;

namespace LocalVllm.Server;

/// <summary>
/// The completions API's <c>logprobs</c> objects (<c>tokens</c>, <c>token_logprobs</c>, <c>top_logprobs</c>,
/// <c>text_offset</c>) for the choices of one response. Each choice's <c>text_offset</c> runs on from event to event:
/// a token's offset is the previous one's plus the length of the previous token's text, as vLLM counts it.
/// </summary>
internal sealed class CompletionLogprobs(Func<int, string> token)
{
    private readonly Dictionary<int, int> _offsets = [];

    /// <summary>
    /// The object for tokens <paramref name="ids"/> of choice <paramref name="choice"/>; a null position (the prompt's
    /// first token, which nothing precedes) has a null log-probability and no alternatives.
    /// </summary>
    public JsonObject Of(int choice, IReadOnlyList<int> ids, IReadOnlyList<PositionLogprobs?> positions)
    {
        if (ids.Count != positions.Count) throw new InvalidOperationException($"{ids.Count} tokens but {positions.Count} log-probability positions.");
        int offset = _offsets.GetValueOrDefault(choice);
        JsonArray tokens = [], logprobs = [], top = [], offsets = [];
        for (int i = 0; i < ids.Count; i++)
        {
            string text = token(ids[i]);
            tokens.Add(text);
            offsets.Add(offset);
            offset += text.Length;
            if (positions[i] is not { } p)
            {
                logprobs.Add(null);
                top.Add(null);
                continue;
            }
            logprobs.Add(p.Logprob);
            var alternatives = new JsonObject();
            foreach (var t in p.Top) alternatives[token(t.TokenId)] = t.Logprob;
            top.Add(alternatives);
        }
        _offsets[choice] = offset;
        return new JsonObject { ["text_offset"] = offsets, ["token_logprobs"] = logprobs, ["tokens"] = tokens, ["top_logprobs"] = top };
    }

    /// <summary>
    /// vLLM's <c>prompt_logprobs</c>: per prompt position null (the first) or an object keyed by token id, holding the
    /// prompt's token and the top alternatives, each with <c>logprob</c>, <c>rank</c> and <c>decoded_token</c>.
    /// </summary>
    public static JsonArray VllmPromptLogprobs(IReadOnlyList<int> ids, IReadOnlyList<PositionLogprobs?> positions, Func<int, string> token)
    {
        var result = new JsonArray();
        for (int i = 0; i < ids.Count; i++)
        {
            if (positions[i] is not { } p)
            {
                result.Add(null);
                continue;
            }
            var entries = new JsonObject();
            void Add(int id, float logprob, int rank) =>
                entries[id.ToString(System.Globalization.CultureInfo.InvariantCulture)] = new JsonObject { ["logprob"] = logprob, ["rank"] = rank, ["decoded_token"] = token(id) };
            Add(p.TokenId, p.Logprob, p.Rank);
            foreach (var t in p.Top)
                if (t.TokenId != p.TokenId) Add(t.TokenId, t.Logprob, t.Rank);
            result.Add(entries);
        }
        return result;
    }
}
