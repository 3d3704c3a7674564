namespace LocalVllm.Engine;

/// <summary>Why a completion ended, as in vLLM.</summary>
public static class FinishReasons
{
    /// <summary>EOS, a stop token or a stop string.</summary>
    public const string Stop = "stop";
    /// <summary>MaxTokens or the model's context length.</summary>
    public const string Length = "length";
    /// <summary>Aborted by the caller.</summary>
    public const string Abort = "abort";
    /// <summary>The request's deadline passed.</summary>
    public const string Timeout = "timeout";
    /// <summary>The request failed; <see cref="RequestOutput.Error"/> says why.</summary>
    public const string Error = "error";
}
