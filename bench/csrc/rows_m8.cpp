// Scratch test behind rows_block3 (kernels/csrc/linear.cpp): 8 inputs against one, two or three weight rows
// at a time, standalone. Not part of the package; the kernel's own measurement is bench.rows3_shapes.
//   g++ -O3 -march=native -fopenmp -DMM=8 bench/csrc/rows_m8.cpp -o /tmp/rows_m8 && OMP_NUM_THREADS=2 /tmp/rows_m8 576 1536
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <chrono>
#include <algorithm>
#include <cmath>
static inline float hsum(__m512 v){return _mm512_reduce_add_ps(v);}
// current: one row, M inputs, prefetch next row
template<int M>
void rows1(const float* x, int64_t K, const float* W, float* y, int64_t ldy, int64_t n0, int64_t n1){
  for(int64_t n=n0;n<n1;++n){ const float* w=W+n*K; __m512 acc[M];
    for(int m=0;m<M;++m) acc[m]=_mm512_setzero_ps();
    for(int64_t k=0;k<K;k+=16){ _mm_prefetch((const char*)(w+K+k),_MM_HINT_T0); __m512 wv=_mm512_loadu_ps(w+k);
      for(int m=0;m<M;++m) acc[m]=_mm512_fmadd_ps(wv,_mm512_loadu_ps(x+m*K+k),acc[m]); }
    for(int m=0;m<M;++m) y[m*ldy+n]=hsum(acc[m]); }
}
// R rows at once: each x vector loaded once for R rows
template<int M,int R>
void rowsR(const float* x, int64_t K, const float* W, float* y, int64_t ldy, int64_t n0, int64_t n1){
  int64_t n=n0;
  for(;n+R<=n1;n+=R){ const float* w=W+n*K; __m512 acc[M][R];
    for(int m=0;m<M;++m) for(int r=0;r<R;++r) acc[m][r]=_mm512_setzero_ps();
    for(int64_t k=0;k<K;k+=16){
      __m512 wv[R];
      for(int r=0;r<R;++r){ _mm_prefetch((const char*)(w+R*K+r*K+k),_MM_HINT_T0); wv[r]=_mm512_loadu_ps(w+r*K+k);}
      for(int m=0;m<M;++m){ __m512 xv=_mm512_loadu_ps(x+m*K+k); for(int r=0;r<R;++r) acc[m][r]=_mm512_fmadd_ps(wv[r],xv,acc[m][r]); }
    }
    for(int m=0;m<M;++m) for(int r=0;r<R;++r) y[m*ldy+n+r]=hsum(acc[m][r]); }
  if(n<n1) rows1<M>(x,K,W,y,ldy,n,n1);
}
template<typename F> void par(int64_t N, F fn){
  const int64_t items=(N+15)/16;
  #pragma omp parallel for schedule(static)
  for(int64_t it=0;it<items;++it){int64_t a=it*16,b=std::min(N,a+16); fn(a,b);}
}
int main(int argc,char**argv){
  int64_t N=atoi(argv[1]),K=atoi(argv[2]); const int M=MM;
  int64_t copies=std::max<int64_t>(1,256LL*1024*1024/(N*K*4));
  std::vector<float*> Ws; for(int c=0;c<copies;++c){float* w=(float*)aligned_alloc(64,N*K*4); for(int64_t i=0;i<N*K;++i) w[i]=(float)((i*7)%13)/13.f-0.5f; Ws.push_back(w);}
  std::vector<float> x(M*K); for(size_t i=0;i<x.size();++i) x[i]=(float)((i*5)%11)/11.f; std::vector<float> y(M*N), y2(M*N);
  rows1<M>(x.data(),K,Ws[0],y.data(),N,0,N); rowsR<M,2>(x.data(),K,Ws[0],y2.data(),N,0,N);
  double md=0; for(size_t i=0;i<y.size();++i) md=std::max(md,(double)std::fabs(y[i]-y2[i])); printf("max diff R2 vs 1: %g\n",md);
  rowsR<M,3>(x.data(),K,Ws[0],y2.data(),N,0,N); md=0; for(size_t i=0;i<y.size();++i) md=std::max(md,(double)std::fabs(y[i]-y2[i])); printf("max diff R3 vs 1: %g\n",md);
  auto bench=[&](const char* name, auto fn){ std::vector<double> r;
    for(int rep=0;rep<7;++rep){auto t=std::chrono::steady_clock::now(); for(auto w:Ws) fn(w); double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t).count()/copies; r.push_back(2.0*M*N*K/s/1e9);}
    std::sort(r.begin(),r.end()); printf("%-20s %.1f GFLOP/s\n",name,r[3]); };
  bench("M8 one row (now)", [&](float* w){ par(N,[&](int64_t a,int64_t b){rows1<M>(x.data(),K,w,y.data(),N,a,b);});});
  bench("M8 two rows", [&](float* w){ par(N,[&](int64_t a,int64_t b){rowsR<M,2>(x.data(),K,w,y.data(),N,a,b);});});
  bench("M8 three rows", [&](float* w){ par(N,[&](int64_t a,int64_t b){rowsR<M,3>(x.data(),K,w,y.data(),N,a,b);});});
  return 0;
}
