namespace LocalVllm.Engine;

/// <summary>How a prompt's final hidden states become one embedding (vLLM's pooling types for decoder models).</summary>
public enum EmbeddingPooling
{
    /// <summary>The last token's hidden state (vLLM's LAST: what decoder embedding models such as Qwen3-Embedding use).</summary>
    Last,
    /// <summary>The mean over the prompt's tokens (vLLM's MEAN).</summary>
    Mean,
}
