using LocalVllm.Engine.Text.Templating;

namespace LocalVllm.Engine.Loading.Hub;

/// <summary>Where models come from: the Hugging Face cache and hub, configured as huggingface_hub does (environment variables by default).</summary>
public sealed record HubOptions
{
    /// <summary>The hub cache: <c>$HF_HUB_CACHE</c>, else <c>$HF_HOME/hub</c>, else <c>~/.cache/huggingface/hub</c>.</summary>
    public string CacheDir { get; init; } = DefaultCacheDir();
    /// <summary>The hub endpoint: <c>$HF_ENDPOINT</c>, else https://huggingface.co.</summary>
    public string Endpoint { get; init; } = Environment.GetEnvironmentVariable("HF_ENDPOINT") is { Length: > 0 } e ? e.TrimEnd('/') : "https://huggingface.co";
    /// <summary>The access token: <c>$HF_TOKEN</c>, else the token file (<c>$HF_TOKEN_PATH</c> or <c>$HF_HOME/token</c>). Sent only to <see cref="Endpoint"/>.</summary>
    public string? Token { get; init; } = DefaultToken();
    /// <summary>Never touch the network (<c>HF_HUB_OFFLINE=1</c>).</summary>
    public bool Offline { get; init; } = Environment.GetEnvironmentVariable("HF_HUB_OFFLINE") is "1" or "true" or "TRUE" or "yes";
    /// <summary>Progress callback for downloads.</summary>
    public IProgress<DownloadProgress>? Progress { get; init; }
    /// <summary>Draw a progress bar per file on an interactive terminal (plain log lines otherwise).</summary>
    public bool ConsoleProgress { get; init; } = true;
    /// <summary>The HTTP handler to use (tests); null uses a default one.</summary>
    public HttpMessageHandler? Handler { get; init; }

    private static string HfHome() =>
        Environment.GetEnvironmentVariable("HF_HOME") is { Length: > 0 } h ? h
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "huggingface");

    private static string DefaultCacheDir() =>
        Environment.GetEnvironmentVariable("HF_HUB_CACHE") is { Length: > 0 } c ? c : Path.Combine(HfHome(), "hub");

    private static string? DefaultToken()
    {
        if (Environment.GetEnvironmentVariable("HF_TOKEN") is { Length: > 0 } t) return t.Trim();
        var path = Environment.GetEnvironmentVariable("HF_TOKEN_PATH") is { Length: > 0 } p ? p : Path.Combine(HfHome(), "token");
        return File.Exists(path) ? File.ReadAllText(path).Trim() : null;
    }
}

/// <summary>Download progress of one file.</summary>
public readonly record struct DownloadProgress(string File, long BytesDone, long? TotalBytes, double BytesPerSecond)
{
    /// <summary>Seconds left at the current rate, when known.</summary>
    public double? EtaSeconds => TotalBytes is long t && BytesPerSecond > 0 ? (t - BytesDone) / BytesPerSecond : null;
}
