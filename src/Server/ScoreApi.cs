using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using Microsoft.AspNetCore.Http;

namespace LocalVllm.Server;

/// <summary>
/// vLLM's scoring endpoints for embedding models, for RAG pipelines that rank passages: <c>POST /v1/score</c>
/// (<c>text_1</c> against each <c>text_2</c>, or pairwise) and <c>POST /v1/rerank</c> (a <c>query</c> against
/// <c>documents</c>, best first, Jina's and Cohere's shape), each score the cosine similarity of the two texts'
/// embeddings (the same vectors <c>/v1/embeddings</c> returns), as vLLM scores with an embedding model.
/// </summary>
internal sealed partial class OpenAiEndpoints
{
    private async Task Score(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        CheckScoringRequest(body, "text_1", "text_2");
        var left = Texts(body, "text_1");
        var right = Texts(body, "text_2");
        if (left.Count != 1 && left.Count != right.Count)
            throw new ApiException(400, $"'text_1' has {left.Count} texts and 'text_2' {right.Count}: give one text_1 for all, or as many as text_2 (scored pairwise).", param: "text_1");
        var (vectors, tokens) = await EmbedForScoring(body, [.. left, .. right]);
        var scores = EmbeddingScores.Pairs(vectors, left.Count);
        var data = new JsonArray();
        for (int i = 0; i < scores.Length; i++) data.Add(new JsonObject { ["index"] = i, ["object"] = "score", ["score"] = scores[i] });
        await Json(ctx, new JsonObject
        {
            ["id"] = $"score-{Guid.NewGuid():N}", ["object"] = "list", ["created"] = DateTimeOffset.UtcNow.ToUnixTimeSeconds(), ["model"] = ModelName, ["data"] = data,
            ["usage"] = new JsonObject { ["prompt_tokens"] = tokens, ["total_tokens"] = tokens },
        });
    }

    private async Task Rerank(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        CheckScoringRequest(body, "query", "documents", "top_n", "return_documents");
        var query = body["query"] is JsonValue q && q.GetValueKind() == JsonValueKind.String ? q.GetValue<string>()
            : throw new ApiException(400, "'query' (a string) is required.", param: "query");
        var documents = Texts(body, "documents");
        int topN = OpenAiChatRequest.Int(body, "top_n") is int n && n > 0 ? Math.Min(n, documents.Count) : documents.Count;
        bool returnDocuments = OpenAiChatRequest.Bool(body, "return_documents") ?? true;
        var (vectors, tokens) = await EmbedForScoring(body, [query, .. documents]);
        var ranked = Enumerable.Range(0, documents.Count).Select(i => (Index: i, Score: EmbeddingScores.Cosine(vectors[0], vectors[i + 1])))
            .OrderByDescending(x => x.Score).Take(topN);
        var results = new JsonArray();
        foreach (var (index, score) in ranked)
        {
            var result = new JsonObject { ["index"] = index, ["relevance_score"] = score };
            if (returnDocuments) result["document"] = new JsonObject { ["text"] = documents[index] };
            results.Add(result);
        }
        await Json(ctx, new JsonObject
        {
            ["id"] = $"rerank-{Guid.NewGuid():N}", ["model"] = ModelName, ["results"] = results,
            ["usage"] = new JsonObject { ["prompt_tokens"] = tokens, ["total_tokens"] = tokens },
        });
    }

    private void CheckScoringRequest(JsonObject body, params string[] fields)
    {
        if (CheckModel(body) is { } lora)
            throw new ApiException(400, $"Scores are not served under a LoRA adapter ('{lora.Name}'); name the base model '{ModelName}'.", param: "model");
        foreach (var (key, _) in body)
            if (key is not ("model" or "user" or "truncate_prompt_tokens" or "encoding_format") && !fields.Contains(key))
                throw new ApiException(400, $"Unknown or unsupported field '{key}'.", param: key);
    }

    /// <summary>A field holding one text or a non-empty array of texts.</summary>
    private static List<string> Texts(JsonObject body, string field) => body[field] switch
    {
        JsonValue v when v.GetValueKind() == JsonValueKind.String => [v.GetValue<string>()],
        JsonArray { Count: > 0 } a when a.All(x => x is JsonValue s && s.GetValueKind() == JsonValueKind.String) => [.. a.Select(x => x!.GetValue<string>())],
        _ => throw new ApiException(400, $"'{field}' must be a string or a non-empty array of strings.", param: field),
    };

    /// <summary>Each text's unit-length embedding (last-token pooling, as /v1/embeddings), and the tokens they took.</summary>
    private async Task<(float[][] Vectors, long Tokens)> EmbedForScoring(JsonObject body, IReadOnlyList<string> texts)
    {
        var real = Real;
        var core = real.Engine.Engine;
        var prompts = texts.Select(t => (IReadOnlyList<int>)core.EncodePrompt(t)).ToList();
        if (OpenAiChatRequest.Int(body, "truncate_prompt_tokens") is int keep)
        {
            var truncation = new SamplingParams { TruncatePromptTokens = keep, MaxTokens = 0 };
            prompts = prompts.Select(p => real.Validator.Truncate(p, truncation)).ToList();
        }
        try
        {
            return (await real.Engine.EmbedAsync(prompts, EmbeddingPooling.Last, normalize: true), prompts.Sum(p => (long)p.Count));
        }
        catch (ArgumentException e)
        {
            throw new ApiException(400, e.Message);
        }
    }
}
