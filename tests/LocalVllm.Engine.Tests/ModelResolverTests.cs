using LocalVllm.Engine.Loading.Hub;
using LocalVllm.Engine.Text.Templating;


namespace LocalVllm.Engine.Tests;

/// <summary>Models by name: the Hugging Face cache layout and downloads from a (fake, local) hub.</summary>
public sealed class ModelResolverTests : IDisposable
{
    private readonly string _home = Directory.CreateTempSubdirectory("lv-hf-").FullName;
    private string Cache => Path.Combine(_home, "hub");

    public void Dispose() => Directory.Delete(_home, recursive: true);

    private HubOptions Options(FakeHub hub, string? token = null, bool offline = false, List<DownloadProgress>? progress = null) => new()
    {
        CacheDir = Cache, Endpoint = hub.Endpoint, Token = token, Offline = offline, ConsoleProgress = false,
        Progress = progress is null ? null : new SyncProgress(progress),
    };

    private sealed class SyncProgress(List<DownloadProgress> sink) : IProgress<DownloadProgress>
    {
        public void Report(DownloadProgress value) { lock (sink) sink.Add(value); }
    }

    [Fact]
    public void A_repo_id_downloads_into_the_hf_cache_layout_resumes_a_dropped_connection_and_loads()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K", dropFirstDownload: true);
        var progress = new List<DownloadProgress>();
        using var llm = new Llm(new EngineOptions { Model = "karpathy/stories260K", Hub = Options(hub, token: "hf_secret", progress: progress), KvCacheMemoryBytes = 8L << 20 });

        var repoDir = Path.Combine(Cache, "models--karpathy--stories260K");
        Assert.Equal(FakeHub.Commit, File.ReadAllText(Path.Combine(repoDir, "refs", "main")));
        var snapshot = Path.Combine(repoDir, "snapshots", FakeHub.Commit);
        Assert.Equal(snapshot, llm.Engine.Directory.Path);
        var weights = new FileInfo(Path.Combine(snapshot, "model.safetensors"));
        Assert.NotNull(weights.LinkTarget); // a symlink into blobs/, as huggingface_hub lays it out
        Assert.StartsWith(Path.Combine("..", "..", "blobs"), weights.LinkTarget);
        Assert.Empty(Directory.GetFiles(Path.Combine(repoDir, "blobs"), "*.incomplete"));
        Assert.False(File.Exists(Path.Combine(snapshot, "README.md"))); // only what the engine needs

        // The CDN dropped the first transfer midway; the download resumed with a range request.
        Assert.Contains(hub.Requests, r => r.Host == "cdn" && r.Range is not null);
        // The token goes to the hub endpoint only, never to the redirect target.
        Assert.Contains(hub.Requests, r => r.Host == "api" && r.Authorized);
        Assert.DoesNotContain(hub.Requests, r => r.Host == "cdn" && r.Authorized);
        Assert.Contains(progress, p => p.File == "model.safetensors" && p.BytesDone == p.TotalBytes);

        var c = Fixtures.Reference("stories260K")["cases"]![0]!;
        var greedy = Fixtures.Ints(c["greedy_ids"]);
        Assert.Equal(greedy, llm.Generate([Fixtures.Ints(c["prompt_ids"])], EngineHarness.Greedy(greedy.Length))[0].Outputs[0].TokenIds);
    }

    [Fact]
    public void A_prepopulated_cache_is_used_without_any_request()
    {
        var snapshot = Path.Combine(Cache, "models--karpathy--stories260K", "snapshots", FakeHub.Commit);
        Directory.CreateDirectory(snapshot);
        foreach (var f in Directory.GetFiles(Fixtures.Model("stories260K"))) File.Copy(f, Path.Combine(snapshot, Path.GetFileName(f)));
        Directory.CreateDirectory(Path.Combine(Cache, "models--karpathy--stories260K", "refs"));
        File.WriteAllText(Path.Combine(Cache, "models--karpathy--stories260K", "refs", "main"), FakeHub.Commit);
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        Assert.Equal(snapshot, ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Equal(snapshot, ModelResolver.Resolve($"karpathy/stories260K@{FakeHub.Commit}", Options(hub)));
        Assert.Empty(hub.Requests);
    }

    [Fact]
    public void A_gated_repo_says_which_model_and_which_token_variable()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K", gatedRepo: "meta-llama/Llama-3.2-1B");
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("meta-llama/Llama-3.2-1B", Options(hub)));
        Assert.Contains("meta-llama/Llama-3.2-1B", e.Message);
        Assert.Contains("HF_TOKEN", e.Message);
        Assert.Contains("401", e.Message);
    }

    [Fact]
    public void An_unknown_repo_or_revision_is_a_404_naming_it()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("nobody/nothing@v2", Options(hub)));
        Assert.Contains("nobody/nothing@v2", e.Message);
        Assert.Contains("404", e.Message);
    }

    [Fact]
    public void Offline_mode_never_touches_the_network_and_names_the_missing_file()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        var snapshot = Path.Combine(Cache, "models--karpathy--stories260K", "snapshots", FakeHub.Commit);
        Directory.CreateDirectory(snapshot);
        File.Copy(Path.Combine(Fixtures.Model("stories260K"), "config.json"), Path.Combine(snapshot, "config.json"));
        Directory.CreateDirectory(Path.Combine(Cache, "models--karpathy--stories260K", "refs"));
        File.WriteAllText(Path.Combine(Cache, "models--karpathy--stories260K", "refs", "main"), FakeHub.Commit);
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub, offline: true)));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains(Cache, e.Message);
        Assert.Empty(hub.Requests);
    }

    [Fact]
    public void No_network_names_the_cache_searched_and_how_to_predownload()
    {
        var options = new HubOptions { CacheDir = Cache, Endpoint = "http://127.0.0.1:9", ConsoleProgress = false };
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", options));
        Assert.Contains(Path.Combine(Cache, "models--karpathy--stories260K"), e.Message);
        Assert.Contains("huggingface-cli download", e.Message);
    }

    /// <summary>Everything under the test's temporary home except the cache folder: must stay empty.</summary>
    private List<string> WrittenOutsideTheCache() =>
        Directory.EnumerateFileSystemEntries(_home, "*", SearchOption.AllDirectories)
            .Where(p => !p.StartsWith(Cache + Path.DirectorySeparatorChar, StringComparison.Ordinal) && p != Cache).ToList();

    [Theory]
    [InlineData("../../../escaped")]
    [InlineData("../../../../../../tmp/escaped")]
    [InlineData("0123456789abcdef0123456789abcdef0123456/..")]
    [InlineData("main")]
    public void A_hostile_commit_sha_is_refused_and_nothing_is_written_outside_the_cache(string sha)
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K") { CommitAnswer = sha };
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Contains(sha, e.Message);
        Assert.Contains("commit", e.Message);
        Assert.Empty(WrittenOutsideTheCache());
    }

    [Theory]
    [InlineData("../../../../escaped-blob")]
    [InlineData("deadbeef")]
    [InlineData("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeX")]
    public void A_hostile_etag_is_refused_and_nothing_is_written_outside_the_cache(string etag)
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K") { EtagAnswer = _ => etag };
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Contains(etag, e.Message);
        Assert.Contains("ETag", e.Message);
        Assert.Empty(WrittenOutsideTheCache());
        Assert.DoesNotContain(Directory.EnumerateFiles(Cache, "*", SearchOption.AllDirectories), f => f.Contains("blobs"));
    }

    [Theory]
    [InlineData("../..")]
    [InlineData("main/../../escape")]
    [InlineData("/etc")]
    [InlineData("refs/./pr")]
    public void A_revision_with_dot_segments_is_refused_before_any_request(string revision)
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve($"karpathy/stories260K@{revision}", Options(hub)));
        Assert.Contains(revision, e.Message);
        Assert.Empty(hub.Requests);
        Assert.Empty(WrittenOutsideTheCache());
    }

    [Fact]
    public void Branch_names_and_pull_request_refs_stay_valid_revisions()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        var dir = ModelResolver.Resolve("karpathy/stories260K@refs/pr/1", Options(hub));
        Assert.Equal(Path.Combine(Cache, "models--karpathy--stories260K", "snapshots", FakeHub.Commit), dir);
        Assert.Equal(FakeHub.Commit, File.ReadAllText(Path.Combine(Cache, "models--karpathy--stories260K", "refs", "refs", "pr", "1")));
        // A poisoned ref file is not trusted as a path: the revision is resolved again through the hub.
        File.WriteAllText(Path.Combine(Cache, "models--karpathy--stories260K", "refs", "main"), "../../../escaped");
        Assert.Equal(dir, ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Empty(WrittenOutsideTheCache());
    }

    private string Blobs => Path.Combine(Cache, "models--karpathy--stories260K", "blobs");
    private string SnapshotWeights => Path.Combine(Cache, "models--karpathy--stories260K", "snapshots", FakeHub.Commit, "model.safetensors");

    [Fact]
    public void A_flipped_byte_fails_the_sha256_check_leaves_no_blob_and_a_retry_succeeds()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        hub.CorruptOnce.Add("model.safetensors");
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("sha256", e.Message);
        var sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(Path.Combine(Fixtures.Model("stories260K"), "model.safetensors"))));
        Assert.False(File.Exists(Path.Combine(Blobs, sha)));
        Assert.False(File.Exists(SnapshotWeights));
        var dir = ModelResolver.Resolve("karpathy/stories260K", Options(hub));
        Assert.Equal(File.ReadAllBytes(Path.Combine(Fixtures.Model("stories260K"), "model.safetensors")), File.ReadAllBytes(Path.Combine(dir, "model.safetensors")));
    }

    [Fact]
    public void A_wrong_etag_fails_the_sha256_check_and_leaves_no_blob_under_it()
    {
        const string Wrong = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K") { EtagAnswer = f => f == "model.safetensors" ? Wrong : null! };
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("sha256", e.Message);
        Assert.Contains(Wrong, e.Message);
        Assert.False(File.Exists(Path.Combine(Blobs, Wrong)));
        Assert.False(File.Exists(SnapshotWeights));
        hub.EtagAnswer = null;
        Assert.True(File.Exists(Path.Combine(ModelResolver.Resolve("karpathy/stories260K", Options(hub)), "model.safetensors")));
    }

    [Fact]
    public void A_wrong_size_fails_the_size_check_and_a_retry_succeeds()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K");
        hub.WrongSizeOnce.Add("model.safetensors");
        var e = Assert.Throws<HubException>(() => ModelResolver.Resolve("karpathy/stories260K", Options(hub)));
        Assert.Contains("model.safetensors", e.Message);
        Assert.Contains("bytes", e.Message);
        Assert.False(File.Exists(SnapshotWeights));
        Assert.DoesNotContain(Directory.EnumerateFiles(Blobs), f => !f.EndsWith(".incomplete", StringComparison.Ordinal) && new FileInfo(f).Length > 100_000);
        var dir = ModelResolver.Resolve("karpathy/stories260K", Options(hub));
        Assert.Equal(File.ReadAllBytes(Path.Combine(Fixtures.Model("stories260K"), "model.safetensors")), File.ReadAllBytes(Path.Combine(dir, "model.safetensors")));
    }

    [Fact]
    public void A_server_that_ignores_range_requests_still_yields_the_exact_file()
    {
        using var hub = new FakeHub(Fixtures.Model("stories260K"), "karpathy/stories260K", dropFirstDownload: true) { IgnoreRange = true };
        var dir = ModelResolver.Resolve("karpathy/stories260K", Options(hub));
        Assert.Equal(File.ReadAllBytes(Path.Combine(Fixtures.Model("stories260K"), "model.safetensors")), File.ReadAllBytes(Path.Combine(dir, "model.safetensors")));
        Assert.Contains(hub.Requests, r => r.Host == "cdn" && r.Range is not null); // it did ask to resume
    }
}
