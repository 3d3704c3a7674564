using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using Microsoft.AspNetCore.Http;

namespace LocalVllm.Server;

/// <summary>
/// <c>POST /v1/embeddings</c> (OpenAI's shape, as vLLM serves it for embedding models): text or token-id inputs, one or
/// a batch; each the last token's final hidden state, unit length (vLLM's pooler for decoder embedding models), or as
/// vLLM's extra fields <c>normalize</c> and <c>pooling</c> ("last", "mean") say; <c>encoding_format</c> float or base64.
/// </summary>
internal sealed partial class OpenAiEndpoints
{
    private async Task Embeddings(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        if (CheckModel(body) is { } lora)
            throw new ApiException(400, $"Embeddings are not served under a LoRA adapter ('{lora.Name}'); name the base model '{ModelName}'.", param: "model");
        var real = Real;
        var core = real.Engine.Engine;
        foreach (var (key, _) in body)
            if (key is not ("model" or "input" or "encoding_format" or "dimensions" or "user" or "normalize" or "pooling" or "truncate_prompt_tokens"))
                throw new ApiException(400, $"Unknown or unsupported field '{key}'.", param: key);
        List<int[]> prompts;
        try
        {
            prompts = OpenAiCompletionRequest.Prompts(new JsonObject { ["prompt"] = body["input"]?.DeepClone() }, text => core.EncodePrompt(text))
                .Select(p => p.Ids).ToList();
        }
        catch (ApiException e) when (e.Param == "prompt")
        {
            throw new ApiException(400, e.Message.Replace("'prompt'", "'input'"), param: "input");
        }
        if (OpenAiChatRequest.Int(body, "truncate_prompt_tokens") is int keep)
        {
            // The engine's one rule (-1: as many as the context holds; nothing is generated after an embedding input).
            var truncation = new SamplingParams { TruncatePromptTokens = keep, MaxTokens = 0 };
            prompts = prompts.Select(p => real.Validator.Truncate(p, truncation).ToArray()).ToList();
        }
        int dimensions = core.Model.Config.HiddenSize;
        if (OpenAiChatRequest.Int(body, "dimensions") is int wanted && wanted != dimensions)
            throw new ApiException(400, $"dimensions = {wanted}: this model's embeddings have {dimensions} dimensions (no truncation is offered).", param: "dimensions");
        var pooling = body["pooling"] is JsonValue p && p.GetValueKind() == JsonValueKind.String
            ? p.GetValue<string>() switch
            {
                "last" => EmbeddingPooling.Last,
                "mean" => EmbeddingPooling.Mean,
                var other => throw new ApiException(400, $"pooling '{other}' is not one of last, mean.", param: "pooling"),
            }
            : EmbeddingPooling.Last;
        bool normalize = OpenAiChatRequest.Bool(body, "normalize") ?? true;
        string format = body["encoding_format"] is JsonValue f && f.GetValueKind() == JsonValueKind.String ? f.GetValue<string>() : "float";
        if (format is not ("float" or "base64"))
            throw new ApiException(400, $"encoding_format '{format}' is not one of float, base64.", param: "encoding_format");
        float[][] vectors;
        try
        {
            vectors = await real.Engine.EmbedAsync(prompts.Select(x => (IReadOnlyList<int>)x).ToList(), pooling, normalize);
        }
        catch (ArgumentException e)
        {
            throw new ApiException(400, e.Message, param: "input");
        }
        var data = new JsonArray();
        for (int i = 0; i < vectors.Length; i++)
            data.Add(new JsonObject
            {
                ["object"] = "embedding", ["index"] = i,
                ["embedding"] = format == "base64"
                    ? Convert.ToBase64String(System.Runtime.InteropServices.MemoryMarshal.AsBytes(vectors[i].AsSpan()))
                    : new JsonArray(vectors[i].Select(x => (JsonNode?)x).ToArray()),
            });
        long tokens = prompts.Sum(x => (long)x.Length);
        await Json(ctx, new JsonObject
        {
            ["object"] = "list", ["data"] = data, ["model"] = ModelName,
            ["usage"] = new JsonObject { ["prompt_tokens"] = tokens, ["total_tokens"] = tokens },
        });
    }
}
